"""Kubernetes for the tests: a real control plane first, an emulator for what it can't do on demand.

The real one (``controlplane.py``: etcd, kube-apiserver, kube-controller-manager with the garbage
collector and namespace controllers, kube-scheduler, all built by ``make cluster-bin``) runs once per
session (the ``control_plane`` fixture in tests/conftest.py) with GPU nodes registered (``nodes.py``)
and the operator logged in as the Helm chart's ServiceAccount with the chart's RBAC (``cluster.py``).
The tests talk to it through ``client.py``, whose methods are the emulator's. On it:
- test_apiserver.py: the CRD installs, ``kubectl explain`` and printer columns, admission of every
  good and bad manifest compared with ``finetune validate``, transition rules by real updates;
- test_operator.py: the lifecycle scenarios (pods moved by ``pods.py``, bound by the real scheduler,
  collected by the real garbage collector), and the real authorizer refusing a missing grant;
- test_runner.py: ``finetune-operator`` as a process, killed and restarted;
- test_system.py: the real trainer in pods run by ``process_kubelet.py``.

The emulator (``emulator.py``: kmock with resourceVersions, conflicts, selectors, resumable watches,
the status subresource and ownerReference GC, in ``semantics.py``) serves on loopback in milliseconds
and does what a real server won't on demand: refusals injected per request (403, 409, 422, 500,
quota), objects that the CRD would have refused, compaction (410 Gone), and many objects at once.
It is used by test_kube_emulator.py (its own semantics) and test_operator_emulated.py (operator
under API refusals, an invalid stored object, fifty jobs, progress polling of a fake rank 0).
"""
