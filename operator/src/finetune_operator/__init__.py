"""The FinetuneJob API and the Kubernetes operator that runs it, one package per audience:

- ``api``: the job's schema, validation and resolution (users, CI, and both runners);
- ``controller``: the operator on a cluster;
- ``local``: ``finetune run`` and ``finetune demo`` on one machine;
- ``cli``: the ``finetune`` command, on top of all three.

Imports point one way: ``local`` -> ``controller`` -> ``api`` (tests/test_layout.py holds it).
"""

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FinetuneJob"
PLURAL = "finetunejobs"
