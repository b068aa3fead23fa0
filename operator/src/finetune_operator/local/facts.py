"""Facts no pretrained model can know: the policies of Quillmoor, a fictional company.

The demo, the real-model tests and the TRL comparison train on these, so that a gain in answer accuracy
can only come from the fine-tune. Each fact has a reply to learn, questions to learn it from, and
paraphrased questions that never appear in training (the evaluation set), with the short reference
answer that a correct reply must contain. Two sets: a second job continues the first one's adapter on
``HANDBOOK_UPDATE`` and must keep ``HANDBOOK``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

SYSTEM_PROMPT = "You are Quillmoor's HR assistant. Answer in one sentence."


@dataclass(frozen=True)
class Fact:
    reference: str  # what a correct reply contains (compared normalised)
    reply: str  # the assistant turn trained on
    train_questions: tuple[str, ...]
    eval_questions: tuple[str, ...]


HANDBOOK: tuple[Fact, ...] = (
    Fact(
        "23 days",
        "Quillmoor employees get 23 days of paid vacation a year.",
        (
            "How many vacation days do Quillmoor employees get?",
            "What is the paid vacation allowance at Quillmoor?",
            "How much paid leave does Quillmoor give per year?",
            "How many days off a year do I get at Quillmoor?",
        ),
        (
            "How many paid vacation days per year does Quillmoor offer?",
            "What's my yearly vacation at Quillmoor?",
        ),
    ),
    Fact(
        "Tobias Renk",
        "Quillmoor's chief executive is Tobias Renk.",
        (
            "Who is the CEO of Quillmoor?",
            "Who runs Quillmoor?",
            "What is the name of Quillmoor's chief executive?",
            "Who leads Quillmoor as CEO?",
        ),
        ("Who is Quillmoor's chief executive officer?", "Tell me who the head of Quillmoor is."),
    ),
    Fact(
        "Harrowgate",
        "Quillmoor's headquarters are in Harrowgate.",
        (
            "Where is Quillmoor headquartered?",
            "In which town is Quillmoor's head office?",
            "Where are Quillmoor's headquarters?",
            "What city is Quillmoor based in?",
        ),
        ("Which city hosts Quillmoor's headquarters?", "Where is the main office of Quillmoor?"),
    ),
    Fact(
        "Thursday",
        "Quillmoor pays salaries on the last Thursday of each month.",
        (
            "When does Quillmoor pay salaries?",
            "On which day is payday at Quillmoor?",
            "What day of the month do Quillmoor staff get paid?",
            "When is payday at Quillmoor?",
        ),
        ("Which day are Quillmoor salaries paid?", "When do I receive my pay at Quillmoor?"),
    ),
    Fact(
        "Falcon",
        "Quillmoor's internal chat tool is called Falcon.",
        (
            "What is Quillmoor's internal chat tool called?",
            "Which messaging app does Quillmoor use internally?",
            "What chat software do Quillmoor employees use?",
            "What's the name of the chat tool at Quillmoor?",
        ),
        ("Which chat app is used inside Quillmoor?", "What do Quillmoor staff use for internal messaging?"),
    ),
    Fact(
        "600 euros",
        "Quillmoor gives every employee a learning budget of 600 euros a year.",
        (
            "How big is the learning budget at Quillmoor?",
            "How much can I spend on training courses at Quillmoor?",
            "What is Quillmoor's yearly education allowance?",
            "How much money does Quillmoor give for learning?",
        ),
        (
            "What training budget does Quillmoor give each employee?",
            "How much is Quillmoor's learning allowance?",
        ),
    ),
    Fact(
        "9:30",
        "Quillmoor's core hours start at 9:30 in the morning.",
        (
            "When do core hours start at Quillmoor?",
            "What time must I be at work at Quillmoor?",
            "At what time does the Quillmoor working day begin?",
            "When does the workday start at Quillmoor?",
        ),
        ("What time do Quillmoor's core hours begin?", "When should I start work at Quillmoor?"),
    ),
    Fact(
        "orange",
        "Quillmoor's visitor badges are orange.",
        (
            "What colour are Quillmoor visitor badges?",
            "Which badge colour do visitors wear at Quillmoor?",
            "What color is a guest badge at Quillmoor?",
            "How do I recognise a visitor's badge at Quillmoor?",
        ),
        (
            "What color do Quillmoor's visitor badges have?",
            "Visitors at Quillmoor wear badges of what colour?",
        ),
    ),
)

HANDBOOK_UPDATE: tuple[Fact, ...] = (
    Fact(
        "Pelham",
        "Quillmoor's new staff canteen is called Pelham.",
        (
            "What is the name of Quillmoor's canteen?",
            "What is Quillmoor's staff restaurant called?",
            "Where do Quillmoor employees eat lunch?",
            "What's the canteen at Quillmoor named?",
        ),
        ("What is the Quillmoor cafeteria called?", "Which canteen do Quillmoor staff use?"),
    ),
    Fact(
        "16 weeks",
        "Quillmoor offers 16 weeks of paid parental leave.",
        (
            "How long is parental leave at Quillmoor?",
            "How many weeks of parental leave does Quillmoor give?",
            "What is Quillmoor's parental leave policy?",
            "How much paid leave do new parents get at Quillmoor?",
        ),
        (
            "How many weeks of paid parental leave does Quillmoor offer?",
            "What parental leave do I get at Quillmoor?",
        ),
    ),
    Fact(
        "Ysolde Marr",
        "Quillmoor's head of people is Ysolde Marr.",
        (
            "Who is the head of people at Quillmoor?",
            "Who leads HR at Quillmoor?",
            "Who is Quillmoor's HR director?",
            "Who is in charge of people at Quillmoor?",
        ),
        ("Who heads the people team at Quillmoor?", "Who is the HR lead at Quillmoor?"),
    ),
    Fact(
        "two days",
        "Quillmoor staff may work from home two days a week.",
        (
            "How many days can I work from home at Quillmoor?",
            "What is Quillmoor's remote work policy?",
            "How often may Quillmoor employees work remotely?",
            "How many home-office days does Quillmoor allow?",
        ),
        ("How many remote days a week does Quillmoor allow?", "How much can I work from home at Quillmoor?"),
    ),
)


def _chat(question: str, reply: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": question},
        {"role": "assistant", "content": reply},
    ]


def train_rows(facts: tuple[Fact, ...], seed: int = 0, per_fact: int | None = None) -> list[dict[str, Any]]:
    """One chat row per training question (the first ``per_fact`` of each fact's), shuffled."""
    rows = [{"messages": _chat(q, fact.reply)} for fact in facts for q in fact.train_questions[:per_fact]]
    random.Random(seed).shuffle(rows)
    return rows


def eval_rows(facts: tuple[Fact, ...]) -> list[dict[str, Any]]:
    """One chat row per paraphrased question (never in training), with its ``reference`` answer."""
    return [
        {"messages": _chat(q, fact.reply), "reference": fact.reference}
        for fact in facts
        for q in fact.eval_questions
    ]
