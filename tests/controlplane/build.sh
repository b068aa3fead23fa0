#!/usr/bin/env bash
# Builds the control plane the tests run against into .cluster/bin/: kube-apiserver,
# kube-controller-manager, kube-scheduler and kubectl of the k8s.io/kubernetes release that go.mod
# pins, and etcd. The version ldflags make `kubectl version` and /version tell the release, not
# v0.0.0-master. Idempotent: go skips a binary whose build ID is unchanged.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "${1:-$here/../../.cluster/bin}"
out="$(cd "${1:-$here/../../.cluster/bin}" && pwd)"
cd "$here"
version="$(go list -m -f '{{.Version}}' k8s.io/kubernetes)"   # e.g. v1.36.3
minor="$(echo "$version" | cut -d. -f2)"
pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
export CGO_ENABLED=0
go build -trimpath -ldflags "$ldflags" -o "$out/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kubectl
go build -trimpath -ldflags "-s -w" -o "$out/etcd" go.etcd.io/etcd/server/v3
