"""What generation-based evaluation asks (each row's prompt and reference), how the prompts are padded,
and the training-only clock and the ETA that /progress reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from finetune_trainer.data import ALPACA_PROMPT_NO_INPUT, prepare
from finetune_trainer.evaluation import left_padded
from finetune_trainer.reporting import ETA_HALF_LIFE_STEPS, Progress, StepRate, TrainingTime

from tests.test_data import dataset

pytestmark = pytest.mark.unit

QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"}]
CONVERSATION = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    *QUESTION,
    {"role": "assistant", "content": "Lima."},
]


# (id, tokenizer, format, columns, row, the decoded prompt, the reference)
PROMPT_CASES: list[tuple[str, str, str, dict[str, str], dict[str, Any], str, str]] = [
    (
        "chat-template: the turns before the last reply, with the generation prompt",
        "template",
        "chat",
        {},
        {"messages": CONVERSATION},
        "<|bos|><|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n<|system|>\nBe brief.<|end|>\n"
        "<|user|>\nCapital of Peru?<|end|>\n<|assistant|>\n",
        "Lima.",
    ),
    (
        "chat-fallback",
        "fallback",
        "chat",
        {},
        {"messages": [*QUESTION, {"role": "assistant", "content": "Lima."}]},
        "<|bos|>### System:\nBe brief.\n\n### User:\nCapital of Peru?\n\n### Assistant:\n",
        "Lima.",
    ),
    (
        "chat: a user turn after the last reply is not part of its prompt",
        "template",
        "chat",
        {},
        {"messages": [*CONVERSATION, {"role": "user", "content": "Thanks"}]},
        "<|bos|><|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n<|system|>\nBe brief.<|end|>\n"
        "<|user|>\nCapital of Peru?<|end|>\n<|assistant|>\n",
        "Lima.",
    ),
    (
        "chat: the reference column wins over the reply",
        "template",
        "chat",
        {},
        {"messages": CONVERSATION, "reference": "Lima"},
        "<|bos|><|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n<|system|>\nBe brief.<|end|>\n"
        "<|user|>\nCapital of Peru?<|end|>\n<|assistant|>\n",
        "Lima",
    ),
    (
        "chat: an empty reference falls back to the reply",
        "template",
        "chat",
        {},
        {"messages": CONVERSATION, "reference": " "},
        "<|bos|><|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n<|system|>\nBe brief.<|end|>\n"
        "<|user|>\nCapital of Peru?<|end|>\n<|assistant|>\n",
        "Lima.",
    ),
    (
        "instruction: the Alpaca prompt, a renamed reference column",
        "template",
        "instruction",
        {"reference": "answer"},
        {"instruction": "Name the capital of Peru.", "output": "The capital is Lima.", "answer": "Lima"},
        "<|bos|>" + ALPACA_PROMPT_NO_INPUT.format(instruction="Name the capital of Peru."),
        "Lima",
    ),
    (
        "instruction: the output is the reference",
        "template",
        "instruction",
        {},
        {"instruction": "Name the capital of Peru.", "output": "The capital is Lima."},
        "<|bos|>" + ALPACA_PROMPT_NO_INPUT.format(instruction="Name the capital of Peru."),
        "The capital is Lima.",
    ),
]


@pytest.mark.parametrize(
    ("name", "flavour", "fmt", "columns", "row", "prompt", "reference"),
    PROMPT_CASES,
    ids=[case[0].split(":")[0] + f"-{index}" for index, case in enumerate(PROMPT_CASES)],
)
def test_chat_and_instruction_rows_carry_their_prompt_and_reference(
    tokenizers: dict[str, Any],
    name: str,
    flavour: str,
    fmt: str,
    columns: dict[str, str],
    row: dict[str, Any],
    prompt: str,
    reference: str,
) -> None:
    tokenizer = tokenizers[flavour]
    (example,), report = prepare([row], dataset(fmt, columns), tokenizer)
    assert report.usable_rows == 1
    assert example.prompt_length is not None
    assert tokenizer.decode(example.input_ids[: example.prompt_length]) == prompt
    assert example.reference == reference


def test_the_chat_prompt_is_the_tokenizers_own_generation_prompt(tokenizers: dict[str, Any]) -> None:
    tokenizer = tokenizers["template"]
    (example,), _ = prepare([{"messages": CONVERSATION}], dataset("chat"), tokenizer)
    expected = tokenizer.apply_chat_template(CONVERSATION[:-1], add_generation_prompt=True)["input_ids"]
    assert example.input_ids[: example.prompt_length] == expected


def test_completion_and_classification_rows_have_no_prompt(tokenizers: dict[str, Any]) -> None:
    tokenizer = tokenizers["template"]
    (completion,), _ = prepare([{"text": "The capital of Peru is Lima."}], dataset("completion"), tokenizer)
    row = {"text": "my invoice", "label": "billing"}
    (labelled,), _ = prepare([row], dataset("classification"), tokenizer)
    assert (completion.prompt_length, completion.reference) == (None, None)
    assert (labelled.prompt_length, labelled.reference) == (None, None)


def test_a_prompt_cut_by_max_seq_length_is_not_asked_but_a_cut_reply_is(tokenizers: dict[str, Any]) -> None:
    tokenizer = tokenizers["template"]
    (whole,), _ = prepare([{"messages": CONVERSATION}], dataset("chat"), tokenizer)
    assert whole.prompt_length is not None
    # The last reply cut after its first token: still asked, with its whole prompt.
    (cut_reply,), report = prepare(
        [{"messages": CONVERSATION}], dataset("chat", max_seq_length=whole.prompt_length + 1), tokenizer
    )
    assert report.truncated_rows == 1
    assert cut_reply.input_ids[: cut_reply.prompt_length] == whole.input_ids[: whole.prompt_length]
    # Cut inside the question: the row still trains on the first reply, but there is nothing to ask.
    (cut_prompt,), _ = prepare(
        [{"messages": CONVERSATION}], dataset("chat", max_seq_length=whole.prompt_length - 1), tokenizer
    )
    assert (cut_prompt.prompt_length, cut_prompt.reference) == (None, None)


def test_a_reference_that_is_not_a_string_makes_the_row_unusable(tokenizers: dict[str, Any]) -> None:
    examples, report = prepare(
        [{"messages": CONVERSATION, "reference": 42}], dataset("chat"), tokenizers["template"]
    )
    assert examples == [] and report.problems == {"'reference' is not a string": [1]}


def test_prompts_are_padded_on_the_left() -> None:
    batch = left_padded([[5, 6, 7], [8]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


class FakeClock:
    """Time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# Each case: what happens between laps ("train", seconds) or ("pause", seconds), and each lap's reading.
@pytest.mark.parametrize(
    ("events", "laps"),
    [
        pytest.param([("train", 10.0), "lap"], [10.0], id="training-only"),
        pytest.param(
            [("train", 4.0), ("pause", 30.0), ("train", 6.0), "lap"], [10.0], id="an-evaluation-is-left-out"
        ),
        pytest.param(
            [("train", 2.0), ("pause", 5.0), "lap", ("train", 3.0), "lap"],
            [2.0, 3.0],
            id="a-pause-belongs-to-its-own-window",
        ),
        pytest.param([("pause", 7.0), ("pause", 1.0), "lap"], [0.0], id="nothing-but-pauses"),
    ],
)
def test_training_time_leaves_out_paused_time(events: list[Any], laps: list[float]) -> None:
    clock = FakeClock()
    timer = TrainingTime(clock)
    readings = []
    for event in events:
        if event == "lap":
            readings.append(timer.lap())
            continue
        kind, seconds = event
        if kind == "pause":
            with timer.paused():
                clock.now += seconds
        else:
            clock.now += seconds
    assert readings == pytest.approx(laps)


def test_training_time_syncs_the_device_before_each_reading() -> None:
    clock, synced = FakeClock(), []
    timer = TrainingTime(clock, sync=lambda: synced.append(clock.now))
    clock.now += 1.0
    with timer.paused():
        clock.now += 1.0
    timer.lap()
    assert synced == [1001.0, 1002.0]  # the pause's start and the lap


# Each case: the step the attempt starts from (a resume starts later), its log windows as (steps,
# training seconds), the total steps, and the ETA /progress then reports.
@pytest.mark.parametrize(
    ("start", "windows", "total", "eta"),
    [
        pytest.param(0, [], 100, None, id="no-window-yet"),
        pytest.param(0, [(10, 20.0)], 100, 180, id="one-window"),
        pytest.param(0, [(10, 20.0), (10, 20.0), (10, 20.0)], 100, 140, id="a-steady-pace"),
        # A slow first step (start-up) is averaged in, weighing a little less than the later steps:
        # 4.38 s a step (the plain average is 4.8 s, the latest window alone would say 2 s).
        pytest.param(0, [(1, 30.0), (9, 18.0)], 100, 395, id="a-slow-first-step-is-averaged-in"),
        # After a resume at step 90 only this attempt's steps count: 10 steps in 20 s, 2 s a step.
        pytest.param(90, [(10, 20.0)], 200, 200, id="resumed"),
        pytest.param(0, [(10, 20.0)], 10, None, id="done"),
    ],
)
def test_the_eta_is_the_average_pace_of_this_attempt(
    start: int, windows: list[tuple[int, float]], total: int, eta: int | None
) -> None:
    progress = Progress(total_steps=total, step=start, training=True)
    for steps, seconds in windows:
        progress.timed_steps(steps, seconds)
        progress.update(step=progress.step + steps)
    assert progress.snapshot()["etaSeconds"] == eta


def test_the_pace_follows_a_lasting_change_and_smooths_a_single_slow_window() -> None:
    steady = StepRate()
    for _ in range(10):
        steady.observe(10, 10.0)  # 1 s a step
    spiked = StepRate(steady.weighted, steady.weight)
    spiked.observe(10, 30.0)  # one window at 3 s a step
    assert spiked.seconds_per_step is not None and 1.0 < spiked.seconds_per_step < 2.0
    changed = StepRate(steady.weighted, steady.weight)
    for _ in range(int(ETA_HALF_LIFE_STEPS)):  # 200 steps at 2 s a step: ten half-lives
        changed.observe(10, 20.0)
    assert changed.seconds_per_step == pytest.approx(2.0, abs=0.01)


def test_progress_reports_the_base_metrics_beside_the_current_ones() -> None:
    progress = Progress(total_steps=10, step=4, training=True)
    progress.update(
        base_metrics={"evalLoss": 3.2, "answerAccuracy": 0.0},
        eval_metrics={"evalLoss": 1.1, "answerAccuracy": 0.5},
    )
    document = progress.snapshot()
    assert document["baseMetrics"] == {"evalLoss": 3.2, "answerAccuracy": 0.0}
    assert document["evalMetrics"] == {"evalLoss": 1.1, "answerAccuracy": 0.5}
    assert Progress().snapshot()["baseMetrics"] == {}


@pytest.mark.parametrize(
    ("patience", "losses", "decisions", "best"),
    [
        # The base model's loss is the first best: a fine-tune that only gets worse stops.
        pytest.param(1, [2.0, 2.5], [True], 2.0, id="worse-than-the-base"),
        # The base evaluation is no evaluation without improvement: one worse evaluation is the first.
        pytest.param(2, [2.0, 2.5, 1.9, 2.1], [False, False, False], 1.9, id="patience-counts-trained-evals"),
    ],
)
def test_the_base_evaluation_is_early_stoppings_first_best(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    patience: int,
    losses: list[float],
    decisions: list[bool],
    best: float,
) -> None:
    import torch
    from finetune_trainer import recipe
    from finetune_trainer.gang import Gang

    from tests.trainer_runs import trainer_config

    values = iter(losses)
    monkeypatch.setattr(recipe, "evaluate", lambda *_args, **_kwargs: {"evalLoss": next(values)})
    stopping = {"earlyStopping": {"patience": patience}}
    job = trainer_config("http://127.0.0.1:9", dataset={"evalSplit": 0.1}, hyperparameters=stopping)
    loop = recipe.FinetuneRecipe(job, Gang(0, tmp_path, stop_grace_seconds=10, stall_timeout_seconds=None))
    loop.ranks = recipe.Ranks(0, 0, 1, torch.device("cpu"))
    loop.engine, loop.eval_examples, loop.labels, loop.tokenizer = None, [], None, None
    loop._evaluate_base()
    assert [loop._evaluate_and_should_stop() for _ in decisions] == decisions
    assert loop.state.best_eval_loss == best
    base = {"evalLoss": losses[0]}
    assert loop.state.base_metrics == base
    assert recipe.LoopState.from_client_state(loop.state.client_state()).base_metrics == base  # checkpoints
    assert loop.history.entries[0] == {"step": 0, **base}
    assert loop.progress.snapshot()["baseMetrics"] == base
    assert loop.final_metrics() == {"evalLoss": losses[-1]}  # the trained model's, not the base's
