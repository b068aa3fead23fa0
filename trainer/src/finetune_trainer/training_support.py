"""What the recipe is built from, none of it specific to one run: the ranks and the gang's store, the
step plan, the learning-rate schedule, the DeepSpeed engine, this rank's
micro-batches, one optimizer step and the reseeding that makes a resume continue the same way.

Kept apart from ``recipe.py`` so the recipe reads as the run itself, and so the throughput
benchmark can time the very ``optimizer_step`` a job runs.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from finetune_trainer import data, host_memory
from finetune_trainer.config import TrainerConfig
from finetune_trainer.data import Example
from finetune_trainer.deepspeed_config import build_deepspeed_config, check_with_deepspeed
from finetune_trainer.errors import NonRetryableError
from finetune_trainer.storage import AccessDeniedError, ObjectNotFoundError
from finetune_trainer.worker_env import DEEPSPEED_TIMEOUT, DEFAULT_PROCESS_GROUP_TIMEOUT_MINUTES
from finetune_trainer.zero3_master_weights import master_weights_shared_when_same_dtype

# What no restart fixes: the trainer exits with the reserved code for these.
NonRetryableFailures = (NonRetryableError, data.DataError, ObjectNotFoundError, AccessDeniedError)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


@dataclass
class Plan:
    """How the data maps to optimizer steps."""

    micro_batches_per_epoch: int
    accumulation: int
    total_steps: int

    def epoch_at(self, step: int) -> float:
        return step * self.accumulation / self.micro_batches_per_epoch


def init_distributed(config: TrainerConfig) -> Ranks:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = config.distributed.uses_gpus and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    minutes = int(os.environ.get(DEEPSPEED_TIMEOUT, DEFAULT_PROCESS_GROUP_TIMEOUT_MINUTES))
    deepspeed.init_distributed(
        dist_backend="nccl" if use_cuda else "gloo", timeout=timedelta(minutes=minutes)
    )
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return Ranks(dist.get_rank(), local_rank, dist.get_world_size(), device)


def gang_store() -> Any:
    """A client of the job's rendezvous store (torchrun's agent on worker 0 hosts it, outliving every
    rank) for the gang's abort mark; None where there is none (a bare process), which leaves each rank
    to the process group alone."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    try:
        return dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=60))
    except (RuntimeError, ValueError) as error:
        logger.warning("no rendezvous store at %s:%s (%s): a failing rank ends its node", host, port, error)
        return None


def make_plan(config: TrainerConfig, train_examples: int, world_size: int) -> Plan:
    hp = config.hyperparameters
    micro = (train_examples // world_size) // hp.batch_size_per_device
    if micro == 0:
        raise NonRetryableError(
            f"{train_examples} training sequences are too few for batchSizePerDevice "
            f"{hp.batch_size_per_device} on {world_size} ranks"
        )
    if hp.max_steps is not None:
        total = hp.max_steps
    else:
        assert hp.epochs is not None
        total = max(1, math.ceil(hp.epochs * micro / hp.gradient_accumulation_steps))
    return Plan(micro, hp.gradient_accumulation_steps, total)


def lr_multiplier(config: TrainerConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warmup from 0, then cosine or linear decay to 0, or constant."""
    hp = config.hyperparameters
    warmup = int(hp.warmup_ratio * total_steps)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if hp.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if hp.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return multiplier


def build_engine(
    config: TrainerConfig,
    model: torch.nn.Module,
    plan: Plan,
    ranks: Ranks,
    ds_config: dict[str, Any] | None = None,
) -> Any:
    """The DeepSpeed engine; ``ds_config`` is the configuration the model was loaded with (ZeRO-3
    loads partitioned by it), built here when not given."""
    hp = config.hyperparameters
    trainable = [p for p in model.parameters() if p.requires_grad]
    if ds_config is None:
        ds_config = build_deepspeed_config(config, ranks.world_size)
    check_with_deepspeed(ds_config, ranks.world_size)  # a rejected config is not worth a restart
    optimizer = None
    if "optimizer" not in ds_config:  # ZeRO-Offload brings DeepSpeed's CPU Adam instead
        # Fused on CPUs too: one pass over each flat ZeRO partition in place, where the per-tensor loop
        # allocates a temporary as large as the partition (Adam's denominator) every step.
        optimizer = torch.optim.AdamW(
            trainable, lr=hp.learning_rate, weight_decay=hp.weight_decay, fused=True
        )
    multiplier = lr_multiplier(config, plan.total_steps)
    with master_weights_shared_when_same_dtype():
        engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=trainable,
            optimizer=optimizer,
            lr_scheduler=lambda built: torch.optim.lr_scheduler.LambdaLR(built, multiplier),
            config=ds_config,
        )
    return engine


def release_optimizer_states(engine: Any) -> None:
    """Drops the optimizer's per-parameter states (Adam's two moments) once training is over, so that
    saving the model, which gathers it, does not hold them too: under ZeRO-3 the rank that consolidates
    the weights peaked at 4.96 GiB saving with them, 3.75 GiB without (benchmarks/memory.py's full
    fine-tune). Checkpoints were written before; nothing steps again."""
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # inside a ZeRO wrapper, or bare
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer.state.clear()


def micro_batches(
    examples: Sequence[Example], ranks: Ranks, batch_size: int, seed: int, start: int
) -> Iterator[list[Example]]:
    """This rank's micro-batches from ``start`` on, forever: a seeded shuffle per epoch.

    ``examples`` may be an on-disk ``ExampleStore``, whose slices are views: only a micro-batch's examples
    are read, and the epoch's order is one int64 tensor, drawn once per epoch."""
    share = examples[ranks.rank :: ranks.world_size][: len(examples) // ranks.world_size]
    per_epoch = len(share) // batch_size
    index = start
    order_epoch, order = -1, torch.empty(0, dtype=torch.long)
    while True:
        epoch, offset = divmod(index, per_epoch)
        if epoch != order_epoch:
            generator = torch.Generator().manual_seed(seed + epoch)
            order_epoch, order = epoch, torch.randperm(len(share), generator=generator)
        chosen = order[offset * batch_size : (offset + 1) * batch_size].tolist()
        yield [share[i] for i in chosen]
        index += 1


def _output_head(module: torch.nn.Module) -> torch.nn.Module | None:
    """The model's output projection (lm_head, tied or not; through a peft wrapper), or None."""
    get = getattr(module, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None
    return head if isinstance(head, torch.nn.Module) else None


def next_token_loss(engine: Any, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """The model's own causal-LM loss (the mean cross-entropy, in fp32, of each labelled token given the
    tokens before it), computed from the labelled positions only.

    A forward pre-hook on the output head hands it only the hidden states of the positions whose next
    token carries a label, so the (batch x sequence x vocabulary) logits, their fp32 copy and their
    log-softmax are never built: with SmolLM2-135M's 49k vocabulary and chat data (loss on the
    assistant turns) that was about a fifth of the step on CPU. ``labels`` is the batch's labels on the
    host, so that the positions are known without a device sync. Models without an output head
    (``get_output_embeddings``) take the model's own loss.
    """
    head = _output_head(engine.module)
    if head is None:
        return engine(**batch).loss
    targets = labels[:, 1:].reshape(-1)
    kept = (targets != data.IGNORE_INDEX).nonzero().squeeze(1)
    device = batch["input_ids"].device
    positions = kept.to(device, non_blocking=True)
    wanted = targets.index_select(0, kept).to(device, non_blocking=True)

    def labelled_positions(_: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0][:, :-1]  # position t predicts token t + 1
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions), *args[1:])

    handle = head.register_forward_pre_hook(labelled_positions)
    try:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = engine(**inputs, use_cache=False).logits
    finally:
        handle.remove()
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), wanted, reduction="sum"
    )
    return loss / max(len(kept), 1)


def optimizer_step(
    engine: Any,
    batches: Iterator[list[Example]],
    collate: Callable[[list[Example]], dict[str, torch.Tensor]],
    accumulation: int,
    loss_sum: torch.Tensor,
    tokens: torch.Tensor,
    trim_heap: bool = False,
) -> None:
    """One optimizer step of ``accumulation`` micro-batches; sums loss and tokens on the device, so
    nothing waits for the GPU here. With ``trim_heap`` the heap's free pages go back to the OS before
    each backward and after each step (host_memory.trims_heap_each_pass says where that pays)."""
    device = loss_sum.device
    for _ in range(accumulation):
        host = collate(next(batches))
        batch = {k: v.to(device, non_blocking=True) for k, v in host.items()}
        loss = next_token_loss(engine, batch, host["labels"])
        if trim_heap:
            host_memory.trim_heap()
        engine.backward(loss)
        engine.step()
        if trim_heap:
            host_memory.trim_heap()
        loss_sum += loss.detach().double()
        tokens += batch["attention_mask"].sum()


def reseed(seed: int, rank: int, step: int) -> None:
    """Seeds that continue across a resume: a function of the seed, the rank and the step."""
    value = (seed * 1_000_003 + rank * 7919 + step) % 2**32
    random.seed(value)
    torch.manual_seed(value)
