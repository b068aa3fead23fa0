//go:build tools

// Package controlplane pins the Kubernetes control plane the tests run against: kube-apiserver,
// kube-controller-manager, kube-scheduler and kubectl of one k8s.io/kubernetes release, and etcd.
// Nothing here is compiled into the project; `make cluster-bin` builds these commands from the
// module graph that go.mod and go.sum fix, since no prebuilt download can be reached.
package controlplane

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
