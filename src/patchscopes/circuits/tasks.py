"""Circuit tasks generated from templates written for this project (no copied data).

Every example is a two-way next-token choice: the prompt, the right continuation (``target``), the
wrong one (``foil``) and a ``corrupt`` prompt, a minimal edit of the prompt whose right answer is the
foil (used by edge attribution patching). Four tasks:

- ``det_noun``: determiner–noun number agreement ("She looked at these" → " cars" / " car");
- ``subj_verb``: subject–verb agreement across a prepositional phrase ("The keys to the door" → " are" / " is");
- ``sentiment``: sentiment of a short review phrase (" positive" / " negative");
- ``hierarchy``: "A robin is a kind of" → " bird" (foil: another category), over the first ``N_KNOWN``
  hyponyms of each category. :func:`new_facts` gives the 150 held-out hyponyms a false category for the
  knowledge-edit view, and :func:`paraphrases` rewords each fact (evaluation only).

>>> from patchscopes.circuits.tasks import make_task
>>> task = make_task("subj_verb", n=8, seed=0)
>>> task.examples[0].prompt, task.examples[0].target, task.examples[0].foil
('The mice near the door', ' were', ' was')
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

from patchscopes.errors import PatchscopeError


class TaskError(PatchscopeError, ValueError):
    """An unknown task name or a task left with too few usable examples."""


@dataclass(frozen=True)
class Example:
    """One two-way choice: ``prompt`` → ``target`` (right) versus ``foil`` (wrong)."""

    prompt: str
    target: str
    foil: str
    corrupt: str
    label: int = 0  # the class of the target (e.g. 1 = plural, positive), for reports
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Task:
    name: str
    examples: list[Example]
    description: str = ""

    def split(self, n_train: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
        """A shuffled (train, held-out) split; the held-out part keeps at least one example."""
        items = list(self.examples)
        random.Random(seed).shuffle(items)
        n_train = min(n_train, len(items) - 1)
        return items[:n_train], items[n_train:]

    def to_rows(self) -> list[dict[str, Any]]:
        return [asdict(e) for e in self.examples]


# --- word lists written for this project -------------------------------------------------------------
NOUNS = [  # singular, plural (regular and irregular)
    ("car", "cars"),
    ("dog", "dogs"),
    ("book", "books"),
    ("house", "houses"),
    ("tree", "trees"),
    ("cat", "cats"),
    ("chair", "chairs"),
    ("table", "tables"),
    ("window", "windows"),
    ("door", "doors"),
    ("bird", "birds"),
    ("flower", "flowers"),
    ("student", "students"),
    ("teacher", "teachers"),
    ("picture", "pictures"),
    ("computer", "computers"),
    ("apple", "apples"),
    ("song", "songs"),
    ("road", "roads"),
    ("city", "cities"),
    ("child", "children"),
    ("man", "men"),
    ("woman", "women"),
    ("person", "people"),
    ("mouse", "mice"),
    ("box", "boxes"),
    ("glass", "glasses"),
    ("story", "stories"),
    ("movie", "movies"),
    ("river", "rivers"),
    ("horse", "horses"),
    ("boat", "boats"),
    ("shirt", "shirts"),
    ("shoe", "shoes"),
    ("key", "keys"),
    ("letter", "letters"),
    ("paper", "papers"),
    ("phone", "phones"),
    ("garden", "gardens"),
    ("plate", "plates"),
]
VERBS_PAST = ["saw", "liked", "found", "bought", "painted", "cleaned", "moved", "noticed", "sold", "wanted"]
NAMES = ["Anna", "Tom", "Maria", "James", "Lucy", "David", "Sara", "Peter", "Emma", "John", "Nina", "Paul"]
DETS = {0: ["this", "that"], 1: ["these", "those"]}
PREP_NOUNS = ["the door", "the garden", "the old house", "the bank", "the station", "the river", "the school", "the shop"]
SV_VERBS = {0: (" is", " was", " has"), 1: (" are", " were", " have")}

POSITIVE = [
    "great",
    "wonderful",
    "excellent",
    "delightful",
    "fantastic",
    "lovely",
    "brilliant",
    "superb",
    "charming",
    "enjoyable",
]
NEGATIVE = ["terrible", "awful", "boring", "dreadful", "horrible", "dull", "poor", "disappointing", "annoying", "bad"]
THINGS = ["movie", "book", "meal", "hotel", "concert", "game", "show", "trip", "album", "play", "service", "class"]
SENTIMENT_SHOTS = "Review: a wonderful film. Sentiment: positive\nReview: an awful meal. Sentiment: negative\n"

HIERARCHY = {  # category → hyponyms written for this project: the first N_KNOWN are known facts, the rest held out for edits
    "bird": [
        "robin", "sparrow", "eagle", "parrot", "owl", "crow", "pigeon",
        "swan", "falcon", "penguin", "hawk", "heron", "stork", "flamingo", "pelican", "ostrich", "vulture", "woodpecker",
        "seagull", "magpie", "wren", "finch",
    ],
    "fish": [
        "salmon", "trout", "tuna", "cod", "shark", "carp", "herring",
        "sardine", "eel", "goldfish", "mackerel", "haddock", "halibut", "perch", "pike", "catfish", "anchovy", "swordfish",
        "tilapia", "flounder", "sturgeon", "minnow",
    ],
    "tree": [
        "oak", "pine", "maple", "birch", "willow", "elm", "cedar",
        "palm", "spruce", "beech", "fir", "poplar", "sycamore", "redwood", "cypress", "larch", "alder", "sequoia", "hickory",
        "aspen", "yew", "baobab",
    ],
    "fruit": [
        "apple", "banana", "cherry", "mango", "peach", "pear", "plum",
        "grape", "lemon", "orange", "apricot", "papaya", "pineapple", "strawberry", "watermelon", "fig", "coconut",
        "raspberry", "blueberry", "pomegranate", "nectarine", "guava",
    ],
    "vehicle": [
        "car", "truck", "bus", "bicycle", "motorcycle", "van", "tractor",
        "taxi", "scooter", "tram", "ambulance", "jeep", "limousine", "lorry", "wagon", "sedan", "minivan", "bulldozer",
        "forklift", "hearse", "locomotive", "snowmobile",
    ],
    "instrument": [
        "guitar", "piano", "violin", "drum", "flute", "trumpet", "cello",
        "harp", "saxophone", "clarinet", "trombone", "tuba", "banjo", "accordion", "oboe", "bassoon", "harmonica",
        "mandolin", "xylophone", "tambourine", "viola", "sitar",
    ],
    "tool": [
        "hammer", "saw", "wrench", "drill", "screwdriver", "chisel", "shovel",
        "axe", "rake", "pliers", "mallet", "crowbar", "trowel", "hatchet", "pickaxe", "sledgehammer", "spanner", "hacksaw",
        "spade", "pitchfork", "awl", "clamp",
    ],
    "flower": [
        "rose", "tulip", "daisy", "lily", "orchid", "sunflower", "daffodil",
        "violet", "poppy", "lavender", "carnation", "marigold", "jasmine", "lilac", "peony", "hyacinth", "dahlia", "begonia",
        "geranium", "petunia", "azalea", "crocus",
    ],
    "dog": [
        "poodle", "beagle", "bulldog", "terrier", "labrador", "collie", "dalmatian",
        "greyhound", "husky", "pug", "spaniel", "retriever", "chihuahua", "dachshund", "rottweiler", "mastiff", "corgi",
        "bloodhound", "whippet", "schnauzer", "doberman", "pomeranian",
    ],
    "metal": [
        "iron", "copper", "gold", "silver", "tin", "zinc", "lead",
        "nickel", "aluminium", "platinum", "titanium", "cobalt", "chromium", "magnesium", "tungsten", "lithium", "sodium",
        "potassium", "calcium", "palladium", "manganese", "bismuth",
    ],
}  # fmt: skip
N_KNOWN = 7  # hyponyms per category in the circuit task (known facts); the rest of each list is held out for edits
N_HELD_OUT = len(HIERARCHY["bird"]) - N_KNOWN  # held-out hyponyms per category (15): new_facts() has 10 × 15 = 150
N_LEGACY_HELD_OUT = 3  # the held-out hyponyms of earlier versions: new_facts()[:30] are the 30 facts they inserted
FACT_TEMPLATE = "{article} {hyponym} is a kind of"  # the prompt the edit trains on
PARAPHRASE_TEMPLATES = (  # other wordings of the same fact: used only to evaluate an edit, never to train it
    "{article} {hyponym} is a type of",
    "{article} {hyponym} is a sort of",
    "{article} {hyponym} belongs to the category of",
)
SHOT_FACTS = (("cow", "animal"), ("shirt", "clothing"))  # the two-shot prefix, in each template's own wording
HIERARCHY_SHOTS = "A cow is a kind of animal. A shirt is a kind of clothing. "


def _article(word: str) -> str:
    return "An" if word[0].lower() in "aeiou" else "A"


def det_noun(n: int, rng: random.Random) -> list[Example]:
    out = []
    for _ in range(n):
        name, verb = rng.choice(NAMES), rng.choice(VERBS_PAST)
        sing, plur = rng.choice(NOUNS)
        number = rng.randint(0, 1)
        det = rng.choice(DETS[number])
        other = DETS[1 - number][DETS[number].index(det)]
        words = (sing, plur)
        prompt = f"{name} {verb} {det}"
        out.append(Example(prompt, " " + words[number], " " + words[1 - number], f"{name} {verb} {other}", number))
    return out


def subj_verb(n: int, rng: random.Random) -> list[Example]:
    out = []
    for _ in range(n):
        sing, plur = rng.choice(NOUNS)
        number = rng.randint(0, 1)
        attractor = rng.choice(PREP_NOUNS)
        k = rng.randrange(3)
        subject = (sing, plur)
        prompt = f"The {subject[number]} near {attractor}"
        corrupt = f"The {subject[1 - number]} near {attractor}"
        out.append(Example(prompt, SV_VERBS[number][k], SV_VERBS[1 - number][k], corrupt, number))
    return out


def sentiment(n: int, rng: random.Random) -> list[Example]:
    out = []
    for _ in range(n):
        positive = rng.randint(0, 1)
        i = rng.randrange(len(POSITIVE))
        words = (NEGATIVE[i], POSITIVE[i])
        thing = rng.choice(THINGS)
        template = "Review: the {thing} was {adj}. Sentiment:"
        prompt = SENTIMENT_SHOTS + template.format(thing=thing, adj=words[positive])
        corrupt = SENTIMENT_SHOTS + template.format(thing=thing, adj=words[1 - positive])
        labels = (" negative", " positive")
        out.append(Example(prompt, labels[positive], labels[1 - positive], corrupt, positive))
    return out


def _statement(template: str, hyponym: str) -> str:
    """One fact's prompt in ``template``'s wording, without the category: "A robin is a kind of"."""
    return template.format(article=_article(hyponym), hyponym=hyponym)


def fact_prompt(hyponym: str, template: str = FACT_TEMPLATE) -> str:
    """The two-shot prompt of ``hyponym`` in ``template``'s wording; the shots use the same wording, so a
    paraphrase changes the whole prompt's relation phrase and not only the last sentence."""
    if "{hyponym}" not in template or "{article}" not in template:
        raise TaskError(f"a fact template needs {{article}} and {{hyponym}} fields, got {template!r}")
    shots = "".join(f"{_statement(template, h)} {c}. " for h, c in SHOT_FACTS)
    return shots + _statement(template, hyponym)


def _fact(hyponym: str, category: str, foil: str, corrupt_hyponym: str) -> Example:
    prompt, corrupt = fact_prompt(hyponym), fact_prompt(corrupt_hyponym)
    categories = sorted(HIERARCHY)
    return Example(prompt, " " + category, " " + foil, corrupt, categories.index(category), {"hyponym": hyponym})


def known_hyponyms() -> dict[str, list[str]]:
    """Category → the hyponyms of the circuit task (the known facts)."""
    return {c: hs[:N_KNOWN] for c, hs in HIERARCHY.items()}


def held_out_hyponyms() -> dict[str, list[str]]:
    """Category → the held-out hyponyms: never in the circuit task, inserted with a false category by edits."""
    return {c: hs[N_KNOWN:] for c, hs in HIERARCHY.items()}


def hierarchy(n: int, rng: random.Random) -> list[Example]:
    """Known facts (the first N_KNOWN hyponyms per category, at most 70); the foil is the category of the corrupt hyponym."""
    pairs = [(h, c) for c, hs in known_hyponyms().items() for h in hs]
    rng.shuffle(pairs)
    out = []
    for hyponym, category in pairs[:n]:  # each fact once: at most len(pairs) examples, so no prompt is in two splits
        other_hyponym, other = rng.choice([p for p in pairs if p[1] != category])
        out.append(_fact(hyponym, category, other, other_hyponym))
    return out


def new_facts(seed: int = 0, n: int | None = None) -> list[Example]:
    """Held-out hyponyms with a *new* (false) category to insert: ``target`` is the new category, ``foil``
    the true one. They were never part of the circuit task. 150 facts (15 per category); ``n`` keeps the
    first ``n``. The first three held-out hyponyms of every category come first, with the same new
    categories as in earlier versions (``new_facts(seed)[:30]``); then the others, category by category."""
    held = held_out_hyponyms()
    total = sum(len(hs) for hs in held.values())
    if n is not None and not 1 <= n <= total:
        raise TaskError(f"new_facts has {total} held-out facts; n must be between 1 and {total}, got n={n}")
    rng = random.Random(seed)
    categories = sorted(HIERARCHY)
    out = []
    for part in (slice(0, N_LEGACY_HELD_OUT), slice(N_LEGACY_HELD_OUT, None)):
        for category, hyponyms in held.items():
            for hyponym in hyponyms[part]:
                new = rng.choice([c for c in categories if c != category])
                prompt = fact_prompt(hyponym)
                meta = {"hyponym": hyponym, "true": category, "template": FACT_TEMPLATE}
                out.append(Example(prompt, " " + new, " " + category, prompt, categories.index(new), meta))
    return out[:n]


def paraphrases(fact: Example, templates: tuple[str, ...] = PARAPHRASE_TEMPLATES) -> list[Example]:
    """The same fact (same new ``target`` and true ``foil``) in other wordings, for evaluating an edit only.

    ``fact`` is one of :func:`new_facts`; each paraphrase keeps its ``meta`` plus the ``template`` used."""
    hyponym = fact.meta.get("hyponym")
    if not hyponym:
        raise TaskError("paraphrases need a fact from new_facts() (its meta names the hyponym)")
    out = []
    for template in templates:
        prompt = fact_prompt(hyponym, template)
        if prompt == fact.prompt:
            raise TaskError(f"paraphrase template {template!r} gives the training prompt itself")
        out.append(Example(prompt, fact.target, fact.foil, prompt, fact.label, {**fact.meta, "template": template}))
    return out


GENERATORS = {"det_noun": det_noun, "subj_verb": subj_verb, "sentiment": sentiment, "hierarchy": hierarchy}
DESCRIPTIONS = {
    "det_noun": "determiner–noun number agreement (this/that vs these/those → singular vs plural noun)",
    "subj_verb": "subject–verb number agreement across a prepositional phrase (is/are, was/were, has/have)",
    "sentiment": "sentiment of a short two-shot review phrase (positive vs negative)",
    "hierarchy": "'X is a kind of Y' facts over 10 categories, 7 known hyponyms each (foil: another category)",
}
TASKS = tuple(GENERATORS)


def make_task(name: str, n: int = 200, seed: int = 0) -> Task:
    """Generate ``n`` examples of task ``name`` (one of :data:`TASKS`)."""
    if name not in GENERATORS:
        raise TaskError(f"unknown circuit task {name!r}; choose one of {', '.join(TASKS)}")
    if n < 2:
        raise TaskError(f"a task needs at least 2 examples (one to train, one held out), got n={n}")
    return Task(name, GENERATORS[name](n, random.Random(seed)), DESCRIPTIONS[name])


@dataclass
class Encoded:
    """Examples tokenized for one model: prompt ids, corrupt ids, first token of target and foil."""

    examples: list[Example]
    ids: list[list[int]]
    corrupt_ids: list[list[int]]
    target_ids: list[int]
    foil_ids: list[int]
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    def subset(self, index: list[int]) -> Encoded:
        return Encoded(
            [self.examples[i] for i in index],
            [self.ids[i] for i in index],
            [self.corrupt_ids[i] for i in index],
            [self.target_ids[i] for i in index],
            [self.foil_ids[i] for i in index],
        )


def _first_token(tokenizer: Any, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise TaskError(f"continuation {text!r} tokenizes to nothing")
    return int(ids[0])


def encode(lm: Any, examples: list[Example], same_length: bool = False) -> Encoded:
    """Tokenize examples for ``lm`` (a ModelHandle). Examples whose target and foil share their first token
    are dropped; with ``same_length`` also those whose corrupt prompt has another token count (EAP needs
    aligned positions). Raises :class:`TaskError` when nothing is left."""
    kept: list[Example] = []
    ids, corrupt, targets, foils = [], [], [], []
    for ex in examples:
        p, c = lm.tokenize(ex.prompt).ids, lm.tokenize(ex.corrupt).ids
        t, f = _first_token(lm.tokenizer, ex.target), _first_token(lm.tokenizer, ex.foil)
        if t == f or (same_length and len(p) != len(c)):
            continue
        kept.append(ex)
        ids.append(list(p))
        corrupt.append(list(c))
        targets.append(t)
        foils.append(f)
    if not kept:
        raise TaskError(
            f"none of the {len(examples)} examples is usable with {lm.name}'s tokenizer "
            "(target and foil share a first token, or corrupt prompts differ in length); generate more examples"
        )
    return Encoded(kept, ids, corrupt, targets, foils, dropped=len(examples) - len(kept))
