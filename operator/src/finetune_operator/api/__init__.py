"""The FinetuneJob API, for everyone who writes or checks a job: the spec model (the one source of the
CRD), CEL rules, offline validation, the names a job's objects get, and the resolution of a job into
the trainer's configuration.

It imports neither the controller nor the local runner: `finetune validate` and the CRD generator
need no Kubernetes client, and both the operator and `finetune run` build on the same API.
"""
