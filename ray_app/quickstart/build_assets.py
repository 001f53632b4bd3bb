"""Regenerates the quickstart's sample data and tokenizer (committed; run only to change them).

    python -m ray_app.quickstart.build_assets

The task is small and regular enough for a tiny random-init model to learn in minutes on
two CPU cores: arithmetic, opposites, capitals and animal sounds, as Alpaca instructions,
chat `messages` and raw text, plus a few deliberately broken lines that must be rejected.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
DATA = HERE / "data"
PREFERENCE = HERE / "preference"
TOKENIZER = HERE / "tokenizer"

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "Austria": "Vienna", "Poland": "Warsaw", "Greece": "Athens",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Ireland": "Dublin", "Hungary": "Budapest", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Peru": "Lima",
    "Chile": "Santiago", "Canada": "Ottawa", "Mexico": "Mexico City", "Cuba": "Havana",
    "Russia": "Moscow", "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Argentina": "Buenos Aires",
    "Australia": "Canberra", "Belgium": "Brussels", "Netherlands": "Amsterdam",
    "Switzerland": "Bern", "Czechia": "Prague", "Romania": "Bucharest", "Ukraine": "Kyiv",
    "Morocco": "Rabat", "Nigeria": "Abuja", "Ghana": "Accra", "Colombia": "Bogota",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark",
    "up": "down", "open": "closed", "early": "late", "full": "empty", "hard": "soft",
    "old": "new", "rich": "poor", "wet": "dry", "loud": "quiet", "strong": "weak",
    "high": "low", "long": "short", "near": "far", "thick": "thin", "clean": "dirty",
    "heavy": "light", "young": "old", "inside": "outside", "first": "last",
}
SOUNDS = {
    "cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa",
    "pig": "oink", "horse": "neigh", "owl": "hoot", "lion": "roar", "frog": "croak",
    "bee": "buzz", "snake": "hiss", "mouse": "squeak", "crow": "caw", "goat": "bleat",
}
SYSTEM = "You are a concise assistant. Answer in one short sentence."


def _qa(rng: random.Random) -> tuple[str, str, str]:
    """One (instruction, input, answer) triple from a random task."""
    kind = rng.choice(["add", "sub", "opposite", "capital", "sound"])
    if kind == "add":
        a, b = rng.randint(0, 60), rng.randint(0, 60)
        return "Add the two numbers.", f"{a} + {b}", str(a + b)
    if kind == "sub":
        a = rng.randint(10, 99)
        b = rng.randint(0, a)
        return "Subtract the second number from the first.", f"{a} - {b}", str(a - b)
    if kind == "opposite":
        word = rng.choice(sorted(OPPOSITES))
        return "Give the opposite of the word.", word, OPPOSITES[word]
    if kind == "capital":
        country = rng.choice(sorted(CAPITALS))
        return "Name the capital city of the country.", country, CAPITALS[country]
    animal = rng.choice(sorted(SOUNDS))
    return "What sound does this animal make?", animal, SOUNDS[animal]


def _chat_turn(rng: random.Random) -> tuple[str, str]:
    instruction, given, answer = _qa(rng)
    if instruction.startswith("Add"):
        return f"What is {given}?", f"{given} = {answer}."
    if instruction.startswith("Subtract"):
        return f"What is {given}?", f"{given} = {answer}."
    if instruction.startswith("Give"):
        return f"What is the opposite of {given}?", f"The opposite of {given} is {answer}."
    if instruction.startswith("Name"):
        return f"What is the capital of {given}?", f"The capital of {given} is {answer}."
    return f"What sound does a {given} make?", f"A {given} says {answer}."


def alpaca_records(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        instruction, given, answer = _qa(rng)
        out.append({"instruction": instruction, "input": given, "output": answer})
    return out


def chat_records(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
        for _turn in range(rng.choice([1, 1, 2])):
            question, answer = _chat_turn(rng)
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]
        out.append({"messages": messages})
    return out


def text_records(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        sentences = [_chat_turn(rng)[1] for _ in range(rng.randint(2, 4))]
        out.append({"text": " ".join(sentences)})
    return out


def preference_records(rng: random.Random, n: int) -> list[dict]:
    """Prompt, a direct correct answer (chosen) and a hedged wrong one (rejected)."""
    out = []
    for _ in range(n):
        question, answer = _chat_turn(rng)
        wrong = answer
        while wrong == answer:
            wrong = _chat_turn(rng)[1]
        out.append({"prompt": question, "chosen": answer,
                    "rejected": f"I am not sure. Maybe {wrong[0].lower()}{wrong[1:]}"})
    return out


BROKEN = {
    "instructions.alpaca.jsonl": [
        '{"instruction": "Add the two numbers.", "input": "3 + 4"',  # truncated JSON
        '{"instruction": "Add the two numbers.", "input": "3 + 4"}',  # no output
        "this line is not JSON at all",
    ],
    "chat.messages.jsonl": [
        '{"messages": []}',  # empty conversation
        '{"messages": [{"role": "robot", "content": "beep"}]}',  # unknown role
        '{"messages": [{"role": "user", "content": "Hi"}]}',  # nothing to learn
    ],
    "facts.text.jsonl": [
        '{"text": 42}',  # wrong type
        '{"text": ""}',  # empty
    ],
}


def write_data(seed: int = 0) -> None:
    rng = random.Random(seed)
    DATA.mkdir(parents=True, exist_ok=True)
    files = {
        "instructions.alpaca.jsonl": alpaca_records(rng, 1600),
        "chat.messages.jsonl": chat_records(rng, 1600),
        "facts.text.jsonl": text_records(rng, 600),
    }
    for name, records in files.items():
        lines = [json.dumps(r) for r in records]
        for k, bad in enumerate(BROKEN[name]):  # spread the broken lines through the file
            lines.insert((k + 1) * len(lines) // (len(BROKEN[name]) + 1), bad)
        (DATA / name).write_text("\n".join(lines) + "\n")
    # DPO sample (jobs/configs/dpo.yaml); its own folder, so the SFT quickstart skips it.
    PREFERENCE.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in preference_records(rng, 1200)]
    (PREFERENCE / "answers.preference.jsonl").write_text("\n".join(lines) + "\n")


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_tokenizer(vocab_size: int = 1024) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = []
    for path in sorted(DATA.glob("*.jsonl")):
        texts += path.read_text().splitlines()
    texts += ["system", "user", "assistant", "Instruction", "Input", "Response"]
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>",
        bos_token=None, unk_token=None, additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    TOKENIZER.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(TOKENIZER)


if __name__ == "__main__":
    write_data()
    write_tokenizer()
    print(f"wrote {DATA} and {TOKENIZER}")
