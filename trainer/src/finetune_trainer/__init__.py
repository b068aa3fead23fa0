"""The fine-tuning program every worker pod runs (``python -m finetune_trainer --config FILE``)."""
