"""The operator, for the cluster: the pure state machine, the reconciler that carries out its
decisions, the kopf handlers, every Kubernetes API call, progress polling, metrics, the objects a job
becomes, and the `finetune-operator` runner.

It builds on the API (``finetune_operator.api``) and never on the local runner.
"""
