"""RULER's synthetic long-context tasks (Hsieh et al. 2024, NVIDIA/RULER), generated offline.

Six tasks, each a prompt generator ``*_prompt(tokenizer, length, seed) -> (prompt, answers)``:

- ``niah_single`` (RULER's ``niah_single_1``): one needle "One of the special magic numbers for {key} is:
  {value}." in a haystack of the repeated noise sentence; the prompt asks for the key's number.
- ``niah_multikey`` (``niah_multikey_1``'s needles): four needles with distinct keys, one key is asked.
- ``niah_multivalue``: four needles with the same key and four values; all four are asked.
- ``niah_multiquery``: four needles with distinct keys; all four keys are asked (all four values).
- ``vt`` (variable tracking): a chain ``VAR ABCDE = 12345``, ``VAR FGHIJ = VAR ABCDE``, ... (4 hops) hidden among
  noise lines, after one short worked example; the answer is every variable that holds the value.
- ``cwe`` (common-word extraction): a numbered list of words where 10 words appear often and the rest rarely
  (6 vs 1 times below 4096 tokens, 30 vs 3 from 4096, as RULER), after one worked example; the answer is the
  10 common words.

The templates, needles, answer prefixes and value formats are RULER's (``scripts/data/synthetic/constants.py``,
``niah.py``, ``variable_tracking.py``, ``common_words_extraction.py``); what differs, for offline use: the NIAH
haystack is always RULER's noise sentence (its multi-key/value/query tasks use Paul Graham essays), keys are
``adjective-noun`` pairs and the words of ``cwe`` come from the small lists below (RULER uses the ``wonderwords``
package's), and when ``cwe`` needs more distinct words than the list holds, every word's count is multiplied by
the same factor (the common/rare ratio stays RULER's).

Lengths follow RULER: ``length`` is the whole sequence, the prompt (counted with the tokenizer's special tokens)
plus the generation budget of :func:`generation_budget`; the haystack fills it as far as its unit (one noise
sentence, one listed word) allows. Every random choice comes from ``seed`` alone, before the haystack is sized,
so the answers of a seed do not depend on the tokenizer or on the length. Pure text: no torch, no model.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic numbers for {key} is: {value}."

# RULER's niah template and answer prefix, and the singular forms RULER derives when one value is asked
NIAH_TEMPLATE = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz you "
    "about the numbers afterwards.\n{context}\nWhat are all the special magic numbers for {query} mentioned in "
    "the provided text?"
)
NIAH_ANSWER_PREFIX = " The special magic numbers for {query} mentioned in the provided text are"
NIAH_TEMPLATE_ONE = (
    "A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you "
    "about the number afterwards.\n{context}\nWhat is the special magic number for {query} mentioned in the "
    "provided text?"
)
NIAH_ANSWER_PREFIX_ONE = " The special magic number for {query} mentioned in the provided text is"

VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
# "assgined" is RULER's spelling; kept so that prompts match RULER's
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assgined the value {query}, they are: "
)
VT_HOPS = 4
VT_EXAMPLE_NOISES = 3  # noise lines of the worked example (RULER's example is sized to ~500 tokens)

CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
    "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
)
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
CWE_COMMON = 10
CWE_LONG = 4096  # RULER's switch: below it common words appear 6 times and rare ones once, from it 30 and 3
CWE_REPEATS = {False: (6, 1), True: (30, 3)}  # {length >= CWE_LONG: (common, rare)}
CWE_EXAMPLE = {False: (20, 3, 1), True: (40, 10, 3)}  # the worked example's (words, common, rare)

# RULER's tokens_to_generate; ours are sized to the answers (generation_budget)
RULER_MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120}


def _words(text: str) -> list[str]:
    return text.split()


ADJECTIVES = _words("""
able angry bitter black blue bold brave bright broad brown busy calm cheap clean clever cold cool crazy curly
damp dark deep dirty dry eager early easy empty fair famous fancy fast fierce flat fresh friendly funny gentle
giant glad golden good grand green grumpy happy hard heavy high hollow honest huge humble hungry icy jolly kind
large lazy light little lively loud lucky mighty modern narrow nasty neat nervous nice noisy odd orange pale
plain polite poor proud purple quick quiet rapid rare rich rough round royal rusty sad safe salty scary sharp
shiny short shy silent silly simple slow small smooth soft solid sour spicy steep sticky strange strict strong
sunny sweet swift tall tame tender thick thin tidy tiny tired tough ugly vast warm weak white wide wild wise
witty wooden yellow young
""")
NOUNS = _words("""
anchor apple arrow baby badge bag ball banana band bank barn basket bath beach bean bear bed bee bell bench
bicycle bird blanket boat bone book boot bottle box bread brick bridge brush bucket butter button cabin cake
camel camera candle canoe card carpet carrot castle chair cheese cherry chicken church circle city clock cloud
coat coffee coin comet cookie corn cow crab crayon crown cup curtain daisy deer desk diamond dog doll dolphin
donkey door dragon drum duck eagle egg elephant engine falcon farm feather fence field finger fish flag flower
flute forest fork fox frog garden garlic gate ghost giraffe glass glove goat grape guitar hammer harbor hat hawk
helmet hill horse hotel house island jacket jar jelly jewel kettle kite kitten knife ladder lake lamp lemon
letter lion lizard lobster mango map maple marble meadow melon mirror monkey moon mountain mouse mushroom needle
nest ocean onion otter owl palace panda paper parrot peach pearl pencil penguin pepper piano pickle pig pillow
pine pirate planet plate pocket pony potato pumpkin puppy queen rabbit radio river robot rocket rose ruby saddle
salad sandal scarf school shark sheep shell ship shoe shovel silver sink skate snail snake sock sofa spider spoon
squirrel stone storm street sugar suitcase table tiger toast tomato tooth towel tower tractor train tree truck
trumpet tulip turtle umbrella valley vase violin wagon wallet walrus whale wheel window wolf zebra
""")
VERBS = _words("""
accept admire arrive bake balance bark bathe begin blink boil borrow bounce breathe build burn carry catch chase
cheer chew climb collect cook count crawl dance deliver dig dive drag draw dream drink drive eat enjoy escape
explain explore fetch fill float fly fold follow forgive gather giggle glow grab greet grow guess hang hike hop
hug hunt invent juggle jump kick knit knock laugh learn lift listen melt mix nap obey paddle paint pick plant play
polish pour pull push read relax remember repair rescue ride roar roll run sail scrub search sew shake shine shout
sing sit skip sleep slide smile sneeze sniff spin splash squeeze stir swim swing talk taste throw tickle travel
trust twist visit wait walk wander wash whisper whistle wink wonder wrap write yawn
""")


def _cwe_words() -> tuple[str, ...]:
    """The words of ``cwe``: no word inside another (or inside the task's own text), so finding a common word in
    an answer (RULER's substring match) means that word was given, not a longer one that contains it."""
    words = sorted(set(NOUNS + ADJECTIVES + VERBS))
    text = (CWE_TEMPLATE + CWE_ANSWER_PREFIX).lower()
    return tuple(w for w in words if w not in text and not any(w != v and w in v for v in words))


CWE_WORDS = _cwe_words()
KEYS = tuple(f"{adjective}-{noun}" for adjective in ADJECTIVES for noun in NOUNS)  # RULER: "adjective-noun"


# ------------------------------------------------------------------------------------------------ sizing


def _count(tokenizer, text: str) -> int:
    """Tokens the model is fed for ``text`` (special tokens included, as the evaluation tokenizes prompts)."""
    return len(tokenizer(text)["input_ids"])


def answer_text(task: str, answers: Sequence[str]) -> str:
    """The answer as a model would write it after the prompt (what :func:`generation_budget` measures)."""
    if task == "cwe":
        return " " + " ".join(f"{i + 1}. {word}" for i, word in enumerate(answers))
    if task == "vt":
        return " " + " ".join(answers)
    return " " + ", ".join(answers) + "."


def generation_budget(tokenizer, task: str, answers: Sequence[str]) -> int:
    """``max_new_tokens`` of a prompt: the answer's tokens plus a margin (half of them, at least 16).

    RULER generates 128 (niah), 30 (vt) or 120 (cwe) tokens whatever the answer; sizing to the answer keeps tiny
    models fast and leaves room for a model that repeats part of the question first.
    """
    n = len(tokenizer(answer_text(task, answers), add_special_tokens=False)["input_ids"])
    return n + max(16, n // 2)


def _fit(
    tokenizer, task: str, length: int, budget: int, build: Callable[[int], str], high: int | None = None
) -> str:
    """``build(n)`` for the largest ``n`` (at most ``high``) whose prompt fits in ``length - budget`` tokens.

    ``build(n)`` is the prompt with ``n`` haystack units; its length grows with ``n``. Raises ValueError when even
    ``build(0)`` does not fit.
    """
    limit = length - budget

    def fits(n: int) -> bool:
        return _count(tokenizer, build(n)) <= limit

    empty = _count(tokenizer, build(0))
    if empty > limit:
        raise ValueError(
            f"{task}: a length of {length} tokens is too short for this tokenizer: the prompt without a haystack "
            f"has {empty} tokens and the answer needs {budget}; use lengths >= {empty + budget}"
        )
    if high is not None and fits(high):
        return build(high)
    probe = 8 if high is None else max(1, min(8, high))
    per_unit = max(1e-9, (_count(tokenizer, build(probe)) - empty) / probe)
    guess = int((limit - empty) / per_unit)  # from the tokens of one unit; exact sizes are measured below
    if high is not None:
        guess = min(guess, high - 1)
    step = max(1, guess // 64)
    if fits(guess):  # gallop up from the estimate to a prompt that is too long
        fitting, too_long = guess, None
        while too_long is None:
            n = fitting + step
            if high is not None and n >= high:
                too_long = high
            elif fits(n):
                fitting, step = n, step * 2
            else:
                too_long = n
    else:  # gallop down to one that fits
        fitting, too_long = None, guess
        while fitting is None:
            n = too_long - step
            if n <= 0:
                fitting = 0
            elif fits(n):
                fitting = n
            else:
                too_long, step = n, step * 2
    while too_long - fitting > 1:  # bisect
        middle = (fitting + too_long) // 2
        if fits(middle):
            fitting = middle
        else:
            too_long = middle
    return build(fitting)


def _insert(units: list[str], items: Sequence[str], depths: Sequence[float]) -> list[str]:
    """``units`` with ``items[i]`` inserted at relative depth ``depths[i]`` (sorted), in order."""
    out, previous = [], 0
    for item, depth in zip(items, depths, strict=True):
        at = round(depth * len(units))
        out += units[previous:at]
        out.append(item)
        previous = at
    return out + units[previous:]


# --------------------------------------------------------------------------------------------------- niah


def _number(rng: random.Random, digits: int, taken: set[str]) -> str:
    while True:
        value = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
        if value not in taken:
            taken.add(value)
            return value


def _niah(
    task: str, tokenizer, length: int, seed: int, *, keys: int = 1, values: int = 1, queries: int = 1
) -> tuple[str, list[str]]:
    rng = random.Random(seed)
    names = rng.sample(KEYS, keys)
    taken: set[str] = set()
    numbers = [[_number(rng, 7, taken) for _ in range(values)] for _ in names]
    needles = [NEEDLE.format(key=k, value=v) for k, vs in zip(names, numbers, strict=True) for v in vs]
    rng.shuffle(needles)
    depths = sorted(rng.random() for _ in needles)
    asked = rng.sample(range(keys), queries)
    query = (
        names[asked[0]]
        if queries == 1
        else ", ".join(names[i] for i in asked[:-1]) + ", and " + names[asked[-1]]
    )
    answers = [v for i in asked for v in numbers[i]]
    one = len(answers) == 1
    template, prefix = (
        (NIAH_TEMPLATE_ONE, NIAH_ANSWER_PREFIX_ONE) if one else (NIAH_TEMPLATE, NIAH_ANSWER_PREFIX)
    )

    def build(n: int) -> str:
        context = "\n".join(_insert([NOISE] * n, needles, depths))
        return template.format(context=context, query=query) + prefix.format(query=query)

    budget = generation_budget(tokenizer, task, answers)
    return _fit(tokenizer, task, length, budget, build), answers


def niah_single_prompt(tokenizer, length: int, seed: int) -> tuple[str, list[str]]:
    """RULER's ``niah_single_1``: one needle in the noise haystack; answers: ``[value]`` (7 digits)."""
    return _niah("niah_single", tokenizer, length, seed)


def niah_multikey_prompt(tokenizer, length: int, seed: int) -> tuple[str, list[str]]:
    """Four needles with distinct keys, one key asked; answers: ``[its value]``."""
    return _niah("niah_multikey", tokenizer, length, seed, keys=4)


def niah_multivalue_prompt(tokenizer, length: int, seed: int) -> tuple[str, list[str]]:
    """Four needles of one key with four values, all asked; answers: the four values."""
    return _niah("niah_multivalue", tokenizer, length, seed, values=4)


def niah_multiquery_prompt(tokenizer, length: int, seed: int) -> tuple[str, list[str]]:
    """Four needles with distinct keys, all four asked; answers: their values, in the order the keys are asked."""
    return _niah("niah_multiquery", tokenizer, length, seed, keys=4, queries=4)


# ---------------------------------------------------------------------------------------------------- vt


def _variables(rng: random.Random, count: int, letters: int, avoid: str) -> list[str]:
    """Distinct random upper-case names, none of them a word of ``avoid`` (so an echo of the text never matches)."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names and name.lower() not in avoid:
            names.append(name)
    return names


def _vt_context(chain: Sequence[str], noises: int, depths: Sequence[float]) -> str:
    """RULER's layout: noise lines (each ending in a newline) with the assignments between them, joined by spaces."""
    return " ".join(_insert([NOISE + "\n"] * noises, chain, depths)).replace(". \n", ".\n")


def _vt_text(chain: Sequence[str], noises: int, depths: Sequence[float], value: str) -> str:
    return VT_TEMPLATE.format(
        context=_vt_context(chain, noises, depths), query=value
    ) + VT_ANSWER_PREFIX.format(num_v=len(chain), query=value)


def _chain(names: Sequence[str], value: str) -> list[str]:
    # RULER's statements, the trailing space of the copies included
    return [f"VAR {names[0]} = {value}"] + [
        f"VAR {b} = VAR {a} " for a, b in zip(names, names[1:], strict=False)
    ]


def vt_prompt(tokenizer, length: int, seed: int) -> tuple[str, list[str]]:
    """Variable tracking, one chain of 4 hops: answers: the 5 variables (5 letters) assigned the value.

    A worked example (3-letter variables, another value, 3 noise lines, its answer) comes first, as in RULER.
    """
    rng = random.Random(seed)
    avoid = (NOISE + VT_TEMPLATE + VT_ANSWER_PREFIX).lower()
    taken: set[str] = set()
    value, example_value = _number(rng, 5, taken), _number(rng, 5, taken)
    names = _variables(rng, VT_HOPS + 1, 5, avoid)
    example_names = _variables(rng, VT_HOPS + 1, 3, avoid)
    depths = sorted(rng.random() for _ in names)
    example_depths = sorted(rng.random() for _ in example_names)
    example = (
        _vt_text(_chain(example_names, example_value), VT_EXAMPLE_NOISES, example_depths, example_value)
        + " "
        + " ".join(example_names)
    )
    chain = _chain(names, value)

    def build(n: int) -> str:
        return example + "\n\n" + _vt_text(chain, n, depths, value)

    return _fit(tokenizer, "vt", length, generation_budget(tokenizer, "vt", names), build), names


# --------------------------------------------------------------------------------------------------- cwe


def _cwe_list(common: Sequence[str], rare: Sequence[str], counts: tuple[int, int], seed: int) -> str:
    listed = [w for w in common for _ in range(counts[0])] + [w for w in rare for _ in range(counts[1])]
    random.Random(seed).shuffle(listed)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed))


def cwe_prompt(tokenizer, length: int, seed: int) -> tuple[str, list[str]]:
    """Common-word extraction: answers: the 10 words that appear most often in the list.

    The list holds the 10 common words and as many rare ones as fit (6 vs 1 times each below 4096 tokens, 30 vs 3
    from 4096). A worked example with other words comes first, as in RULER.
    """
    rng = random.Random(seed)
    long = length >= CWE_LONG
    example_words, example_common, example_rare = CWE_EXAMPLE[long]
    order = rng.sample(CWE_WORDS, len(CWE_WORDS))
    # the example's words come first (as many as the longer example needs, so the answers do not depend on the length)
    reserved = max(words for words, _, _ in CWE_EXAMPLE.values())
    example, pool = order[:example_words], order[reserved:]
    common = pool[:CWE_COMMON]
    shuffle_seed = rng.randrange(2**32)
    example_list = _cwe_list(
        example[:CWE_COMMON], example[CWE_COMMON:], (example_common, example_rare), shuffle_seed
    )
    head = (
        CWE_TEMPLATE.format(context=example_list)
        + CWE_ANSWER_PREFIX
        + " "
        + " ".join(f"{i + 1}. {w}" for i, w in enumerate(example[:CWE_COMMON]))
        + "\n"
    )
    budget = generation_budget(tokenizer, "cwe", common)

    def builder(times: int) -> Callable[[int], str]:
        counts = (CWE_REPEATS[long][0] * times, CWE_REPEATS[long][1] * times)

        def build(n: int) -> str:  # n rare words
            words = _cwe_list(common, pool[CWE_COMMON : CWE_COMMON + n], counts, shuffle_seed + n)
            return head + CWE_TEMPLATE.format(context=words) + CWE_ANSWER_PREFIX

        return build

    rare = len(pool) - CWE_COMMON
    limit = length - budget

    def all_words_fit(times: int) -> bool:
        return _count(tokenizer, builder(times)(rare)) <= limit

    # more words than the list holds: every count is multiplied by the same factor (RULER's ratio stays), the
    # smallest factor at which all the words no longer fit
    times = max(1, limit // _count(tokenizer, builder(1)(rare)))
    if all_words_fit(times):
        while all_words_fit(times + 1):
            times += 1
        times += 1
    else:
        while times > 1 and not all_words_fit(times - 1):
            times -= 1
    if times > 1 and _count(tokenizer, builder(times)(0)) > limit:
        return builder(times - 1)(rare), list(common)
    return _fit(tokenizer, "cwe", length, budget, builder(times), high=rare), list(common)


# ------------------------------------------------------------------------------------------------ registry

RULER_TASKS: dict[str, Callable[..., tuple[str, list[str]]]] = {
    "niah_single": niah_single_prompt,
    "niah_multikey": niah_multikey_prompt,
    "niah_multivalue": niah_multivalue_prompt,
    "niah_multiquery": niah_multiquery_prompt,
    "vt": vt_prompt,
    "cwe": cwe_prompt,
}
TASK_NAMES = tuple(RULER_TASKS)


def check_tasks(names: Sequence[str], argument: str = "tasks") -> tuple[str, ...]:
    """The task names of ``names`` (``"all"``: every task), in the order given, without repeats.

    Raises ValueError naming ``argument`` and the allowed names for an unknown name or an empty list.
    """
    if isinstance(names, str):
        names = [names]
    allowed = ", ".join(TASK_NAMES)
    if not names:
        raise ValueError(f"{argument}: give at least one RULER task: {allowed} (or all)")
    unknown = [n for n in names if n not in RULER_TASKS and n != "all"]
    if unknown:
        raise ValueError(f"{argument}: unknown RULER task {unknown[0]!r}; choose from {allowed} (or all)")
    expanded = [t for n in names for t in (TASK_NAMES if n == "all" else [n])]
    return tuple(dict.fromkeys(expanded))


def ruler_prompt(task: str, tokenizer, length: int, seed: int) -> tuple[str, list[str]]:
    """The prompt of ``task`` (a name of :data:`RULER_TASKS`) and its answers."""
    (task,) = check_tasks([task], "task")
    return RULER_TASKS[task](tokenizer, length, seed)
