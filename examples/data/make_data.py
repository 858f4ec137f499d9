"""Generate the E2E-style data-to-text dataset shipped in ``examples/data/``.

Each example turns a meaning representation (MR) such as
``name[The Eagle] | eatType[pub] | food[Italian] | area[riverside] | customer rating[5 out of 5]``
into one fluent English sentence, as in the E2E NLG challenge used by the prefix-tuning paper (Li & Liang, 2021).

Every record of the JSON-lines files holds:

- ``mr``: the meaning representation, slots in a fixed order, joined by `` | ``;
- ``slots``: the same slots as a dict;
- ``text``: the reference sentence. Every slot value except ``familyFriendly`` appears in it verbatim (the example's
  "slot coverage" metric counts these), ``familyFriendly`` is rendered as "family-friendly" / "not family-friendly".

The sentence is assembled from an opening clause (name, type and food, with several phrasings) followed by the other
slots in random order, each with two to four phrasings and random connectors, so one slot combination has many
surface forms. The generator is seeded: re-running it reproduces the shipped files byte for byte.

Usage:

```bash
python examples/data/make_data.py                      # writes train/validation/test.jsonl next to this file
python examples/data/make_data.py --seed 1 --train 5000 --out /tmp/e2e
```
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = [
    "The Eagle",
    "The Golden Curry",
    "Blue Spice",
    "The Punter",
    "Zizzi",
    "The Mill",
    "Aromi",
    "Cotto",
    "The Cricketers",
    "Fitzbillies",
    "Giraffe",
    "Green Man",
    "Loch Fyne",
    "The Phoenix",
    "Strada",
    "Wildwood",
    "The Vaults",
    "Alimentum",
    "Bibimbap House",
    "Browns Cambridge",
    "Clowns",
    "The Dumpling Tree",
    "The Olive Grove",
    "The Plough",
    "The Rice Boat",
    "The Twenty Two",
    "The Waterman",
    "Midsummer House",
    "Cocum",
    "Taste of Cambridge",
    "The Wrestlers",
    "Travellers Rest Beefeater",
    "The Cambridge Blue",
    "The Golden Palace",
    "Red Lion",
    "The Sorrento",
    "Copper Kettle",
    "The Lantern",
    "Silver Birch",
    "The Old Oak",
]
NEAR = [
    "Café Rouge",
    "Burger King",
    "The Sorrento",
    "Raja Indian Cuisine",
    "Crowne Plaza Hotel",
    "All Bar One",
    "Ranch",
    "Yippee Noodle Bar",
    "Café Brazil",
    "The Portland Arms",
    "Express by Holiday Inn",
    "Rainbow Vegetarian Café",
    "Avalon",
    "Café Sicilia",
    "The Bakers",
    "Clare Hall",
]
EAT_TYPES = ["restaurant", "coffee shop", "pub"]
FOODS = ["Italian", "French", "Chinese", "Indian", "Japanese", "English", "Fast food"]
PRICES = ["cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"]
RATINGS = ["low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"]
AREAS = ["riverside", "city centre"]
SLOT_ORDER = ["name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near"]


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _opening(rng: random.Random, slots: dict[str, str]) -> str:
    name, kind, food = slots["name"], slots.get("eatType"), slots.get("food")
    if kind and food:
        noun = f"{food} {kind}"
        return rng.choice(
            [
                f"{name} is {_article(noun)} {noun}",
                f"{name} is {_article(kind)} {kind} serving {food} food",
                f"{name} is {_article(kind)} {kind} that offers {food} food",
                f"There is {_article(noun)} {noun} called {name}",
            ]
        )
    if kind:
        return rng.choice([f"{name} is {_article(kind)} {kind}", f"There is {_article(kind)} {kind} called {name}"])
    if food:
        return rng.choice([f"{name} serves {food} food", f"{name} offers {food} food", f"{name} provides {food} food"])
    return rng.choice([f"{name} is a place to eat", f"{name} is an eatery"])


def _clause(rng: random.Random, slot: str, value: str) -> str:
    if slot == "priceRange":
        if value in ("cheap", "moderate", "high"):
            return rng.choice([f"with {value} prices", f"with a {value} price range", f"in the {value} price range"])
        return rng.choice([f"with prices {value}", f"with a price range of {value}", f"where meals cost {value}"])
    if slot == "customer rating":
        if "out of" in value:
            return rng.choice([f"rated {value} by customers", f"with a customer rating of {value}", f"rated {value}"])
        return rng.choice(
            [
                f"with a {value} customer rating",
                f"with {value} ratings from customers",
                f"rated {value} by its customers",
            ]
        )
    if slot == "area":
        return rng.choice([f"in the {value} area", f"located in the {value}", f"found in the {value}"])
    if slot == "near":
        return rng.choice([f"near {value}", f"close to {value}", f"not far from {value}"])
    if slot == "familyFriendly":
        if value == "yes":
            return rng.choice(["and it is family-friendly", "which is family-friendly", "that is family-friendly"])
        return rng.choice(
            ["and it is not family-friendly", "which is not family-friendly", "that is not family-friendly"]
        )
    raise ValueError(slot)


def make_example(rng: random.Random) -> dict:
    """Draw one random meaning representation and a reference sentence for it.

    Args:
        rng (`random.Random`): The random generator (seeded by the caller).

    Example:

    ```py
    >>> make_example(random.Random(0))["mr"]
    'name[...] | eatType[...] | ...'
    ```
    """
    slots = {"name": rng.choice(NAMES)}
    optional = {
        "eatType": rng.choice(EAT_TYPES),
        "food": rng.choice(FOODS),
        "priceRange": rng.choice(PRICES),
        "customer rating": rng.choice(RATINGS),
        "area": rng.choice(AREAS),
        "familyFriendly": rng.choice(["yes", "no"]),
        "near": rng.choice([n for n in NEAR if n != slots["name"]]),
    }
    chosen = rng.sample(sorted(optional), rng.randint(2, 5))
    for key in SLOT_ORDER:
        if key in chosen:
            slots[key] = optional[key]
    rest = [k for k in SLOT_ORDER if k in slots and k not in ("name", "eatType", "food")]
    rng.shuffle(rest)
    # "family-friendly" reads best last
    rest.sort(key=lambda k: k == "familyFriendly")
    parts = [_opening(rng, slots)]
    for key in rest:
        clause = _clause(rng, key, slots[key])
        if key != "familyFriendly" and len(parts) > 1 and rng.random() < 0.3:
            clause = "and " + clause
        parts.append(clause)
    text = " ".join(parts)
    if rng.random() < 0.3 and len(parts) > 2:  # an alternative, two-sentence style
        text = parts[0] + ". It is " + " ".join(parts[1:]).replace("and it is ", "and ", 1)
        text = text.replace("It is which is", "It is").replace("It is that is", "It is")
    text = text[0].upper() + text[1:] + "."
    mr = " | ".join(f"{k}[{v}]" for k, v in slots.items())
    return {"mr": mr, "slots": slots, "text": text}


def generate(seed: int = 42, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """Generate the splits. A meaning representation appears in one split only.

    Args:
        seed (`int`): Random seed.
        sizes (`dict[str, int]`, *optional*): Number of examples per split; 1000/200/200 by default.
    """
    sizes = sizes or {"train": 1000, "validation": 200, "test": 200}
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, size in sizes.items():
        rows: list[dict] = []
        while len(rows) < size:
            example = make_example(rng)
            if example["mr"] in seen:
                continue
            seen.add(example["mr"])
            rows.append(example)
        splits[split] = rows
    return splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--validation", type=int, default=200)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    splits = generate(args.seed, {"train": args.train, "validation": args.validation, "test": args.test})
    args.out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(args.out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} examples to {args.out / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
