"""The local runner, for one machine: `finetune run` (the same resolution and state machine as the
operator, the ranks as local processes) and `finetune demo`.

It builds on the API and on the controller's state machine; nothing imports it but the CLI.
"""
