"""Offline preference tasks: the "human labeler" is a program with a gold reward.

InstructGPT's labelers rank K samples per prompt; here a gold reward function ranks them, so the
whole SFT → RM → PPO pipeline runs with no downloads, and we can measure what RLHF is for: the
policy's *gold* reward (which PPO never sees — it only sees the learned RM) should rise, while
KL from the SFT model stays near its target.

`SentimentTask` is the text analogue of lm-human-preferences' sentiment task, sized for a tiny
model: the human asks about a topic, the assistant answers "<topic> is <adj> and <adj>.", and
the gold reward is the mean sentiment of the adjectives (+1 positive, −1 negative, 0 neutral).
Demonstrations pick adjectives uniformly, so the SFT policy starts at mean reward 0 with a wide
spread, and there is room to improve by a shift in word choice that costs a measurable KL.
The mean (not the sum) keeps "never stop, say more good words" from paying.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import gin
import numpy as np

from gptjax.data.tokenizer import Tokenizer, train_sentencepiece
from gptjax.rlhf import chat

POSITIVE = ("good", "great", "happy", "kind", "bright", "warm", "calm", "lovely")
NEGATIVE = ("bad", "sad", "cold", "dark", "angry", "dull", "rude", "grim")
NEUTRAL = ("big", "old", "small", "green", "tall", "long", "round", "new")
TOPICS = (
    "the sea",
    "my cat",
    "the city",
    "a tree",
    "the weather",
    "my day",
    "the road",
    "the house",
    "a book",
    "the sky",
    "the garden",
    "my dog",
    "the river",
    "the town",
)
ASKS = ("Tell me about {}.", "Describe {}.", "What is {} like?", "How is {}?")


@dataclasses.dataclass(frozen=True)
class SentimentTask:
    """Answers about a topic, scored by the mean sentiment of their adjectives.

    min_adjectives, max_adjectives: demonstration lengths (uniform).
    """

    min_adjectives: int = 2
    max_adjectives: int = 4

    @property
    def name(self) -> str:
        return "sentiment"

    def sample_prompt(self, rng: np.random.Generator) -> list[chat.Turn]:
        """One Human turn asking about a random topic."""
        topic = TOPICS[rng.integers(len(TOPICS))]
        return [(chat.HUMAN, ASKS[rng.integers(len(ASKS))].format(topic))]

    def _sentence(self, topic: str, rng: np.random.Generator) -> str:
        n = int(rng.integers(self.min_adjectives, self.max_adjectives + 1))
        words = POSITIVE + NEGATIVE + NEUTRAL
        adjectives = [words[i] for i in rng.integers(len(words), size=n)]
        return f"{topic} is {' and '.join(adjectives)}."

    def demonstration(self, prompt: Sequence[chat.Turn], rng: np.random.Generator) -> str:
        """A labeler-written answer: the prompt's topic with uniformly chosen adjectives."""
        return self._sentence(topic_of(prompt), rng)

    def gold_reward(self, prompt: Sequence[chat.Turn], response: str) -> float:
        """Mean sentiment of the response's words among the lexicon (0 when it has none)."""
        del prompt  # the labeler's taste does not depend on the topic
        words = [w.strip(".,!?").lower() for w in response.split()]
        scores = [1.0 if w in POSITIVE else -1.0 for w in words if w in POSITIVE + NEGATIVE]
        n_adjectives = sum(w in POSITIVE + NEGATIVE + NEUTRAL for w in words)
        return float(sum(scores) / n_adjectives) if n_adjectives else 0.0

    def pretrain_documents(self, n: int, rng: np.random.Generator) -> list[str]:
        """Plain text (no dialogue) from the same world: the 'pretraining corpus' of PPO-ptx."""
        docs = []
        for _ in range(n):
            k = int(rng.integers(2, 6))
            docs.append(
                " ".join(
                    self._sentence(TOPICS[rng.integers(len(TOPICS))], rng).capitalize()
                    for _ in range(k)
                )
            )
        return docs


def topic_of(prompt: Sequence[chat.Turn]) -> str:
    """The topic named in a SentimentTask question (the last Human turn)."""
    question = [text for role, text in prompt if role == chat.HUMAN][-1]
    for topic in TOPICS:
        if topic in question:
            return topic
    return "it"


TASKS = {"sentiment": SentimentTask}


@gin.configurable
def make_task(name: str = "sentiment", **kwargs) -> SentimentTask:
    """The task by name; gin: `make_task.name = 'sentiment'`."""
    if name not in TASKS:
        raise ValueError(f"unknown RLHF task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](**kwargs)


def demonstrations(task, n: int, seed: int) -> list[tuple[list[chat.Turn], str]]:
    """n (prompt turns, demonstration) pairs, deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = task.sample_prompt(rng)
        out.append((prompt, task.demonstration(prompt, rng)))
    return out


def prompts(task, n: int, seed: int) -> list[list[chat.Turn]]:
    rng = np.random.default_rng(seed)
    return [task.sample_prompt(rng) for _ in range(n)]


def build_tokenizer(task, vocab_size: int = 512, seed: int = 0) -> Tokenizer:
    """A small BPE trained on the task's dialogues and documents: words become single ids."""
    rng = np.random.default_rng(seed)
    dialogues = [
        chat.render(p + [(chat.ASSISTANT, r)]) for p, r in demonstrations(task, 2000, seed)
    ]
    return train_sentencepiece(dialogues + task.pretrain_documents(500, rng), vocab_size)
