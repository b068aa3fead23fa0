#!/usr/bin/env bash
# Moves the control plane to another Kubernetes release: ./pin.sh 1.36.3
# k8s.io/kubernetes's own go.mod points its staging modules (k8s.io/api, k8s.io/client-go, ...) at
# ./staging, which a dependent module cannot resolve; each becomes a replace to the published v0.N.M.
set -euo pipefail
cd "$(dirname "$0")"
version="${1#v}"
gomod="$(go mod download -json "k8s.io/kubernetes@v$version" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
for module in $(sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$gomod"); do
  go mod edit -replace="$module=$module@v0.${version#1.}"
done
go mod edit -require="k8s.io/kubernetes@v$version"
go mod tidy
