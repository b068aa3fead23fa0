"""The emulated Kubernetes API (tests/kube) behaves as kopf and our operator need, over real HTTP."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import kmock
import kopf
import kubernetes
import pytest

from tests.kube.fixtures import emulated_cluster, running_operator
from tests.kube.semantics import CRD, FINETUNEJOBS

MERGE = {"Content-Type": "application/merge-patch+json"}
JSON_PATCH = {"Content-Type": "application/json-patch+json"}
JOBS = f"/apis/{FINETUNEJOBS.group}/{FINETUNEJOBS.version}/namespaces/ns/{FINETUNEJOBS.plural}"
CMS, PODS = "/api/v1/namespaces/ns/configmaps", "/api/v1/namespaces/ns/pods"
LABELS = {"finetune.dev/job": "j"}

pytestmark = pytest.mark.asyncio


async def call(session: aiohttp.ClientSession, method: str, path: str, body: Any = None, **kw: Any) -> Any:
    """Send a request; return (status, parsed JSON body)."""
    headers = kw.pop("headers", JSON_PATCH if isinstance(body, list) else MERGE if method == "PATCH" else {})
    async with session.request(method, path, json=body, headers=headers, **kw) as resp:
        return resp.status, await resp.json()


async def watch(session: aiohttp.ClientSession, path: str, count: int = 1000, **params: str) -> list[Any]:
    """Read up to ``count`` events of a watch-stream, or until the server ends it."""
    events: list[Any] = []
    async with session.get(path, params={"watch": "true", **params}) as resp, asyncio.timeout(5):
        assert resp.status == 200
        while len(events) < count and (line := await resp.content.readline()):
            events.append(json.loads(line))
    return events


def meta(name: str, **fields: Any) -> dict[str, Any]:
    """A minimal object body."""
    return {"metadata": {"name": name, **fields}}


def owned_by(*owners: dict[str, Any]) -> list[dict[str, Any]]:
    """ownerReferences to these ConfigMaps."""
    return [
        {"apiVersion": "v1", "kind": "ConfigMap"} | {k: o["metadata"][k] for k in ("name", "uid")}
        for o in owners
    ]


def names(objs: list[Any]) -> list[str]:
    return sorted(obj["metadata"]["name"] for obj in objs)


def core_v1(url: str) -> kubernetes.client.CoreV1Api:
    """The official (synchronous) client: call it via asyncio.to_thread, as the emulator shares our loop."""
    return kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(kubernetes.client.Configuration(host=url)))


async def test_discovery_serves_core_resources_and_the_crd_from_its_manifest() -> None:
    async with emulated_cluster() as (url, kube), aiohttp.ClientSession(url) as session:
        _, core = await call(session, "GET", "/api/v1")
        core_names = {r["name"] for r in core["resources"]}
        assert core["groupVersion"] == "v1"
        needed = {"namespaces", "pods", "pods/status", "services", "configmaps", "events", "secrets"}
        assert needed <= core_names
        for group_version, plural in [("batch/v1", "jobs"), ("coordination.k8s.io/v1", "leases")]:
            _, found = await call(session, "GET", f"/apis/{group_version}")
            assert plural in {r["name"] for r in found["resources"]}
        _, ours = await call(session, "GET", f"/apis/{FINETUNEJOBS.group}/{FINETUNEJOBS.version}")
        entry = next(r for r in ours["resources"] if r["name"] == FINETUNEJOBS.plural)
        assert entry["kind"] == CRD["spec"]["names"]["kind"] and entry["namespaced"] is True
        assert entry["shortNames"] == CRD["spec"]["names"]["shortNames"]
        assert f"{FINETUNEJOBS.plural}/status" in {r["name"] for r in ours["resources"]}
        _, crds = await call(session, "GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
        assert names(crds["items"]) == [CRD["metadata"]["name"]]
        # kmock 0.8 crashes on these paths: the namespaces resource.
        kube.create_object("v1/namespaces", meta("ns"))
        assert names((await call(session, "GET", "/api/v1/namespaces"))[1]["items"]) == ["ns"]
        assert (await call(session, "GET", "/api/v1/namespaces/ns"))[1]["kind"] == "Namespace"


async def test_writes_assign_uid_resource_version_timestamps_and_generation() -> None:
    async with emulated_cluster() as (url, kube), aiohttp.ClientSession(url) as session:
        status, cm = await call(session, "POST", CMS, {"metadata": {"name": "a"}, "data": {"k": "1"}})
        md = cm["metadata"]
        assert status == 201 and md["uid"] and md["creationTimestamp"] and md["generation"] == 1
        assert cm["apiVersion"] == "v1" and cm["kind"] == "ConfigMap" and md["namespace"] == "ns"
        _, changed = await call(session, "PATCH", f"{CMS}/a", {"data": {"k": "2"}})
        assert int(changed["metadata"]["resourceVersion"]) > int(md["resourceVersion"])
        assert changed["metadata"]["generation"] == 2 and changed["metadata"]["uid"] == md["uid"]
        _, labelled = await call(session, "PATCH", f"{CMS}/a", {"metadata": {"labels": {"x": "y"}}})
        assert labelled["metadata"]["generation"] == 2  # metadata changes do not bump it
        _, same = await call(session, "PATCH", f"{CMS}/a", {"data": {"k": "2"}})
        assert same["metadata"]["resourceVersion"] == labelled["metadata"]["resourceVersion"]  # a no-op
        status, error = await call(session, "POST", CMS, meta("a"))
        assert (status, error["reason"]) == (409, "AlreadyExists")
        status, generated = await call(session, "POST", CMS, {"metadata": {"generateName": "gen-"}})
        assert status == 201 and generated["metadata"]["name"].startswith("gen-")
        assert kube.get_object("v1/configmaps", "ns", "a")["data"] == {"k": "2"}


async def test_stale_writes_answer_409_and_failed_json_patch_tests_answer_422() -> None:
    async with emulated_cluster() as (url, kube), aiohttp.ClientSession(url) as session:
        _, cm = await call(session, "POST", CMS, {"metadata": {"name": "a"}, "data": {"k": "1"}})
        await call(session, "PATCH", f"{CMS}/a", {"data": {"k": "2"}})  # now `cm` is stale
        status, error = await call(session, "PUT", f"{CMS}/a", cm)
        assert (status, error["reason"]) == (409, "Conflict") and "has been modified" in error["message"]
        stale = {"metadata": {"resourceVersion": cm["metadata"]["resourceVersion"]}, "data": {"k": "3"}}
        assert (await call(session, "PATCH", f"{CMS}/a", stale))[0] == 409
        test = {"op": "test", "path": "/metadata/resourceVersion", "value": cm["metadata"]["resourceVersion"]}
        add_finalizer = {"op": "add", "path": "/metadata/finalizers", "value": ["x"]}
        status, error = await call(session, "PATCH", f"{CMS}/a", [test, add_finalizer])
        assert (status, error["reason"]) == (422, "Invalid")  # kopf retries its finalizer patches on 422
        fresh = kube.get_object("v1/configmaps", "ns", "a")
        test["value"] = fresh["metadata"]["resourceVersion"]
        _, patched = await call(session, "PATCH", f"{CMS}/a", [test, add_finalizer])
        assert patched["metadata"]["finalizers"] == ["x"]
        # The same through the official client, which parses the Status objects:
        api = core_v1(url)
        stale_cm = kubernetes.client.V1ConfigMap(
            metadata=kubernetes.client.V1ObjectMeta(name="a", resource_version="1")
        )
        with pytest.raises(kubernetes.client.ApiException) as exc_info:
            await asyncio.to_thread(api.replace_namespaced_config_map, "a", "ns", stale_cm)
        assert exc_info.value.status == 409
        current = await asyncio.to_thread(api.read_namespaced_config_map, "a", "ns")
        current.data = {"k": "put"}
        replaced = await asyncio.to_thread(api.replace_namespaced_config_map, "a", "ns", current)
        assert replaced.data == {"k": "put"} and replaced.metadata.uid == cm["metadata"]["uid"]


async def test_lists_and_watches_filter_by_label_and_field_selectors() -> None:
    async with emulated_cluster() as (url, kube), aiohttp.ClientSession(url) as session:
        for name, labels in [("a", {"app": "a", "tier": "x"}), ("b", {"app": "b"}), ("c", {})]:
            kube.create_object("v1/pods", meta(name, labels=labels), namespace="ns")
        kube.create_object("v1/pods", meta("d", labels={"app": "a"}), namespace="other")
        kube.patch_object("v1/pods", "ns", "b", {"status": {"phase": "Running"}}, sub="status")
        selections = {
            "app=a": ["a"], "app==a,tier=x": ["a"], "app!=a": ["b", "c"], "app": ["a", "b"], "!app": ["c"],
            "app in (a, b)": ["a", "b"], "app notin (a)": ["b", "c"],
        }  # fmt: skip
        for selector, expected in selections.items():
            _, found = await call(session, "GET", PODS, params={"labelSelector": selector})
            assert names(found["items"]) == expected, selector
            assert found["kind"] == "PodList" and found["metadata"]["resourceVersion"].isdigit()
        fields = {
            "metadata.name=c": ["c"],
            "status.phase=Running": ["b"],
            "status.phase!=Running": ["a", "c"],
        }
        for selector, expected in fields.items():
            _, found = await call(session, "GET", PODS, params={"fieldSelector": selector})
            assert names(found["items"]) == expected, selector
        params = {"fieldSelector": "metadata.namespace=other"}
        assert names((await call(session, "GET", "/api/v1/pods", params=params))[1]["items"]) == ["d"]
        assert (await call(session, "GET", PODS, params={"labelSelector": "app in a"}))[0] == 400
        # A watch sees objects entering the selection as ADDED, leaving it as DELETED:
        rv = (await call(session, "GET", PODS))[1]["metadata"]["resourceVersion"]
        kube.patch_object("v1/pods", "ns", "c", {"metadata": {"labels": {"app": "a"}}})
        kube.patch_object("v1/pods", "ns", "a", {"metadata": {"labels": {"app": None}}})
        events = await watch(session, PODS, 2, labelSelector="app=a", resourceVersion=rv)
        changes = [(e["type"], e["object"]["metadata"]["name"]) for e in events]
        assert changes == [("ADDED", "c"), ("DELETED", "a")]
        # With no version, a watch starts with the current state:
        events = await watch(session, PODS, 1, fieldSelector="metadata.name=b")
        assert [(e["type"], e["object"]["status"]) for e in events] == [("ADDED", {"phase": "Running"})]


async def test_watches_resume_from_a_version_without_losing_events_and_send_bookmarks() -> None:
    async with emulated_cluster(bookmark_interval=0.05) as (url, kube), aiohttp.ClientSession(url) as session:
        kube.create_object("v1/configmaps", meta("old"), namespace="ns")
        rv = (await call(session, "GET", CMS))[1]["metadata"]["resourceVersion"]
        # Changes between the list and the watch are replayed to a watch from the list's version:
        await call(session, "POST", CMS, meta("new"))
        await call(session, "PATCH", f"{CMS}/new", {"data": {"k": "v"}})
        await call(session, "DELETE", f"{CMS}/old")
        events = await watch(session, CMS, 4, resourceVersion=rv, allowWatchBookmarks="true")
        changes = [(e["type"], e["object"]["metadata"].get("name")) for e in events]
        assert changes == [("ADDED", "new"), ("MODIFIED", "new"), ("DELETED", "old"), ("BOOKMARK", None)]
        versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
        assert versions == sorted(versions) and versions[0] > int(rv)
        # Initial events end with a marked bookmark; the server-side timeout ends the stream:
        params = {"sendInitialEvents": "true", "allowWatchBookmarks": "true", "timeoutSeconds": "0.2"}
        events = await watch(session, CMS, **params)
        assert [e["type"] for e in events][:2] == ["ADDED", "BOOKMARK"]
        assert events[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
        # After a compaction, old versions are gone, as in etcd: kopf re-lists on this 410.
        kube.compact()
        events = await watch(session, CMS, resourceVersion=rv)
        assert [(e["type"], e["object"]["code"]) for e in events] == [("ERROR", 410)]


async def test_status_subresource_is_the_only_way_to_change_the_status() -> None:
    async with emulated_cluster() as (url, kube), aiohttp.ClientSession(url) as session:
        job = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob", "metadata": {"name": "j"}}
        status, created = await call(
            session, "POST", JOBS, job | {"spec": {"a": 1}, "status": {"phase": "X"}}
        )
        assert status == 201 and "status" not in created  # ignored on creation, as in Kubernetes
        both = {"spec": {"a": 2}, "status": {"phase": "Ignored"}}
        _, patched = await call(session, "PATCH", f"{JOBS}/j", both)
        assert patched["spec"] == {"a": 2} and "status" not in patched
        assert patched["metadata"]["generation"] == 2
        both = {"spec": {"a": 3}, "status": {"phase": "Running"}}
        _, patched = await call(session, "PATCH", f"{JOBS}/j/status", both)
        assert patched["spec"] == {"a": 2} and patched["status"] == {"phase": "Running"}
        assert patched["metadata"]["generation"] == 2  # status changes do not bump it
        assert (await call(session, "GET", f"{JOBS}/j/status"))[1]["status"] == {"phase": "Running"}
        kube.create_object("v1/pods", meta("p"), namespace="ns")
        _, pod = await call(session, "PATCH", f"{PODS}/p/status", {"status": {"phase": "Failed"}})
        assert pod["status"] == {"phase": "Failed"}
        kube.create_object("v1/configmaps", meta("c"), namespace="ns")
        status, _ = await call(session, "PATCH", f"{CMS}/c/status", {"data": {}})
        assert status == 404  # ConfigMaps have no status subresource


async def test_deleting_an_owner_collects_its_dependents_after_its_finalizers() -> None:
    async with emulated_cluster() as (url, kube), aiohttp.ClientSession(url) as session:
        owner = kube.create_object("v1/configmaps", meta("owner", finalizers=["f"]), "ns")
        other = kube.create_object("v1/configmaps", meta("other"), "ns")
        child = kube.create_object("v1/pods", meta("child", ownerReferences=owned_by(owner)), "ns")
        kube.create_object("v1/secrets", meta("grandchild", ownerReferences=owned_by(child)), "ns")
        kube.create_object("v1/pods", meta("shared", ownerReferences=owned_by(owner, other)), "ns")
        status, _ = await call(session, "DELETE", f"{CMS}/owner", {"preconditions": {"uid": "wrong"}})
        assert status == 409
        _, marked = await call(session, "DELETE", f"{CMS}/owner")
        assert marked["metadata"]["deletionTimestamp"]  # held by its finalizer, with its dependents
        assert names(kube.list_objects("v1/pods", "ns")) == ["child", "shared"]
        await call(session, "PATCH", f"{CMS}/owner", {"metadata": {"finalizers": None}})
        assert kube.get_object("v1/configmaps", "ns", "owner") is None
        assert names(kube.list_objects("v1/pods", "ns")) == ["shared"]  # still owned by "other"
        assert kube.list_objects("v1/secrets", "ns") == []  # cascaded through "child"
        kube.delete_object("v1/namespaces", None, "ns")
        assert kube.list_objects("v1/pods") == [] and kube.list_objects("v1/configmaps") == []


async def test_events_of_both_apis_are_accepted_and_listable() -> None:
    async with emulated_cluster() as (url, kube), aiohttp.ClientSession(url) as session:
        about = {"apiVersion": "v1", "kind": "Pod", "name": "p", "namespace": "ns"}
        core = {"metadata": {"generateName": "p."}, "involvedObject": about, "reason": "Core"}
        assert (await call(session, "POST", "/api/v1/namespaces/ns/events", core))[0] == 201
        new = {"metadata": {"name": "p.1"}, "regarding": about, "reason": "New", "action": "A"}
        assert (await call(session, "POST", "/apis/events.k8s.io/v1/namespaces/ns/events", new))[0] == 201
        assert [e["reason"] for e in kube.events_for("p", "ns")] == ["Core", "New"]
        assert len((await call(session, "GET", "/api/v1/namespaces/ns/events"))[1]["items"]) == 1


async def test_refusals_simulate_forbidden_invalid_and_quota_errors() -> None:
    async with emulated_cluster() as (url, kube), aiohttp.ClientSession(url) as session:
        pod = meta("p")
        with kube.refusing("create", "v1/pods", namespace="ns", message='pods "p" is forbidden: by RBAC'):
            status, error = await call(session, "POST", PODS, pod)
            assert (status, error["reason"]) == (403, "Forbidden")
            assert error["message"] == 'pods "p" is forbidden: by RBAC'
            assert (await call(session, "POST", "/api/v1/namespaces/other/pods", pod))[0] == 201
        kube.refuse("create", "v1/pods", status=422, message="spec.containers: Required value", times=1)
        assert (await call(session, "POST", PODS, pod))[1]["reason"] == "Invalid"
        assert (await call(session, "POST", PODS, pod))[0] == 201  # refused only once
        quota = kube.exceed_quota("v1/pods", "ns")
        with pytest.raises(kubernetes.client.ApiException) as exc_info:
            await asyncio.to_thread(core_v1(url).create_namespaced_pod, "ns", meta("q"))
        assert exc_info.value.status == 403 and "exceeded quota" in json.loads(exc_info.value.body)["message"]
        kube.refusals.remove(quota)
        assert (await call(session, "POST", PODS, meta("q")))[0] == 201
        assert quota.hits == 1


def make_operator(calls: list[tuple[str, str]]) -> kopf.OperatorRegistry:
    """A tiny operator: a ConfigMap per FinetuneJob, a status via /status, an event, an index of pods."""
    registry = kopf.OperatorRegistry()
    group, version, plural = FINETUNEJOBS.group, FINETUNEJOBS.version, FINETUNEJOBS.plural

    @kopf.index("v1", "pods", labels={"finetune.dev/job": kopf.PRESENT}, id="pods_by_job", registry=registry)
    async def pods_by_job(name: str, labels: dict[str, str], **_: Any) -> dict[str, str]:
        return {labels["finetune.dev/job"]: name}

    @kopf.on.resume(group, version, plural, id="resume", registry=registry)
    @kopf.on.create(group, version, plural, id="create", registry=registry)
    async def ensure_config(
        body: kopf.Body, name: str, namespace: str, reason: str, retry: int, memo: kopf.Memo, **kwargs: Any
    ) -> dict[str, Any]:
        calls.append((str(reason), name))
        child = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-config"}}
        kopf.adopt(child, owner=body)  # namespace, labels, ownerReferences
        async with aiohttp.ClientSession(memo.url) as session:
            status, _ = await call(session, "POST", f"/api/v1/namespaces/{namespace}/configmaps", child)
            if status not in (201, 409):  # 409: made by an earlier run of this handler
                raise kopf.TemporaryError(f"creating the config failed with {status}", delay=0.1)
            path = f"/apis/{group}/{version}/namespaces/{namespace}/{plural}/{name}/status"
            status, _ = await call(session, "PATCH", path, {"status": {"phase": "Configured"}})
            assert status == 200
        kopf.info(body, reason="ConfigCreated", message=f"{name}-config")
        if reason == "create" and retry == 0:
            raise kopf.TemporaryError("fail once after creating the child: run again", delay=0.1)
        return {"pods": sorted(kwargs["pods_by_job"].get(name, []))}

    @kopf.on.delete(group, version, plural, id="delete", registry=registry)
    async def forget(name: str, **_: Any) -> None:
        calls.append(("delete", name))

    return registry


async def test_a_kopf_operator_against_the_emulator() -> None:
    calls: list[tuple[str, str]] = []
    registry = make_operator(calls)
    async with emulated_cluster() as (url, kube):
        memo = kopf.Memo(url=url)
        kube.create_object("v1/pods", meta("w0", labels=LABELS), "ns")
        kube.create_object("v1/pods", meta("stray"), "ns")
        async with running_operator(url, registry, namespaces=["ns"], memo=memo) as run:
            kube.create_object(FINETUNEJOBS, {"metadata": {"name": "j"}, "spec": {}}, "ns")
            job = await kube.wait_for(
                lambda: (kube.get_object(FINETUNEJOBS, "ns", "j") or {}).get("status", {}).get("create")
            )
            assert job == {"pods": ["w0"]}  # indexed before the handlers ran; "stray" has no label
            assert calls == [("create", "j"), ("create", "j")]  # ran twice, tolerated its own child
            configs = kube.list_objects("v1/configmaps", "ns")
            owner = kube.get_object(FINETUNEJOBS, "ns", "j")
            assert names(configs) == ["j-config"]
            assert configs[0]["metadata"]["ownerReferences"][0]["uid"] == owner["metadata"]["uid"]
            assert owner["status"]["phase"] == "Configured" and owner["metadata"]["finalizers"]
            events = await kube.wait_for(
                lambda: [e for e in kube.events_for("j", "ns") if e["reason"] == "ConfigCreated"]
            )
            assert events[0]["source"]["component"] == "kopf"
            kube.create_object("v1/pods", meta("w1", labels=LABELS), "ns")
            await kube.wait_for(lambda: sorted(run.indices["pods_by_job"].get("j", [])) == ["w0", "w1"])

        async with running_operator(url, registry, namespaces=["ns"], memo=memo):
            await kube.wait_for(lambda: ("resume", "j") in calls)  # found the existing job, made no new child
            await kube.wait_for(lambda: kube.get_object(FINETUNEJOBS, "ns", "j")["status"].get("resume"))
            assert names(kube.list_objects("v1/configmaps", "ns")) == ["j-config"]
            kube.delete_object(FINETUNEJOBS, "ns", "j")  # held by kopf's finalizer until its handler runs
            await kube.wait_for(lambda: kube.get_object(FINETUNEJOBS, "ns", "j") is None)
            assert kube.list_objects("v1/configmaps", "ns") == []  # garbage-collected
        assert calls == [("create", "j"), ("create", "j"), ("resume", "j"), ("delete", "j")]


async def test_kmock_reactions_go_first_and_server_errors_fail_the_test() -> None:
    with pytest.raises(ExceptionGroup, match="failed on some requests"):
        async with emulated_cluster() as (url, kube), aiohttp.ClientSession(url) as session:
            kube[kmock.action.FETCH, kmock.resource("v1/configmaps")] << {"canned": True}
            kube[kmock.action.LIST, kmock.resource("v1/configmaps")] << ZeroDivisionError
            assert (await call(session, "GET", f"{CMS}/any")) == (200, {"canned": True})
            status, error = await call(session, "GET", CMS)
            assert (status, error["reason"]) == (500, "InternalError")
