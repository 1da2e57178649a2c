"""Nouns / noun phrases of a caption: the words of caption supervision (the grounding loss).

PARITY with the official ``get_noun_phrase`` (``odise/modeling/meta_arch/odise.py``): the union of
the phrases of two chunk grammars over Penn part-of-speech tags,

    NBAR: {<NN.*|JJ>*<NN.*>}        nouns and adjectives, ending with a noun
    NP:   {<NBAR><IN><NBAR>}        "slice of pizza" (with prepositions) ...
          {<NBAR>}                  ... or a single NBAR

in the caption's own case, read by the official loop (:func:`_official_loop`): a phrase is emitted
when a token that is not part of a phrase follows it (so a phrase that ends the caption is not,
unless punctuation follows), and adjacent phrases, or a phrase following one already emitted,
merge. A caption without a phrase gives the empty word, which the grounding loss masks out.
:func:`official_phrases` implements the grammars on tagged tokens; the tags come from nltk's
tagger when its data is installed (as the official code) and otherwise from :func:`heuristic_tags`,
a dependency-free tagger for caption language (nltk's tagger model is a run-time download that fails
offline). ``rules="ours"`` keeps this project's earlier chunker (maximal content-word runs,
determiners dropped, lower case), a departure kept as an option.

``python -m odise_pl.data.nouns`` reads captions on stdin, one per line, and prints each caption's
phrases on one line, separated by ``|``.
"""

from __future__ import annotations

import random
import re
import sys

_DETERMINERS = set(
    "a an the some any this that these those his her their its my your our each every another either neither "
    "one two three four five six seven eight nine ten eleven twelve several many few lots lot plenty number "
    "couple pair group bunch both all no much more most other".split()
)
_FUNCTION = _DETERMINERS | set(
    "on in at of with without under over near next to by from behind above below beside besides into onto upon "
    "through across along around inside outside against between toward towards down up off out for while as "
    "like during after before past beneath underneath atop amongst among via and or but nor so yet then than "
    "is are was were be been being am has have had do does did will would can could should may might must "
    "it he she they them him we us i you who whom whose which what where when why how there here "
    "very too also just not only still together almost nearly about away back top front side "
    "while whilst if because".split()
)
# Nouns of the common caption vocabulary that look like verb forms.
_ING_NOUNS = set(
    "building buildings ceiling clothing painting paintings king ring rings thing things wing wings string "
    "swing swings evening morning icing railing railings siding frosting topping toppings bedding parking "
    "sibling siblings ping pudding stuffing awning awnings dumpling dumplings sling spring wedding "
    "crossing crossings landing living dining filling seasoning lighting".split()
)
_ED_NOUNS = set("bed sled shed red seed seeds bread head sheep speed weed weeds".split())
_VERBS = set(
    "sits sit stands stand holds hold looks look rides ride flies fly lies lie plays play eats eat walks walk "
    "runs run waits wait watches watch carries carry shows show contains contain uses use sits rests rest "
    "hangs hang grazes graze leans lean flies swims swim jumps jump throws throw catches catch hits hit "
    "takes take makes make gets get goes go drives drive crosses cross talks talk poses pose smiles smile "
    "appears appear seems seem features feature displays display covers cover fills fill tops top "
    "prepares prepare cuts cut wears wear points point reads read travels travel lays lay stares stare "
    "sleeps sleep drinks drink kicks kick swings brushes brush flying".split()
)
_ADJECTIVES = set(
    "red blue green yellow white black brown gray grey orange purple pink silver golden gold dark light "
    "big small large little tall short long old young new empty full open closed wooden metal plastic "
    "clean dirty busy sunny cloudy wet dry hot cold cute pretty beautiful nice fresh huge tiny "
    "colorful single double various different same many several other".split()
)

_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*|[,;:!?()\"]")


def _is_verb(tok: str) -> bool:
    if tok in _VERBS:
        return True
    if tok.endswith("ing") and len(tok) > 4 and tok not in _ING_NOUNS:
        return True
    return tok.endswith("ed") and len(tok) > 4 and tok not in _ED_NOUNS


def _heuristic(caption: str) -> list[str]:
    toks = _WORD.findall(caption.lower())
    phrases, cur = [], []

    def flush():
        # Trailing modifiers are not nouns ("the sky is blue" -> no "blue"); a run of only adjectives is dropped.
        while cur and (cur[-1] in _ADJECTIVES or _is_verb(cur[-1])):
            cur.pop()
        if cur:
            phrases.append(" ".join(cur))
        cur.clear()

    for i, tok in enumerate(toks):
        nxt = toks[i + 1] if i + 1 < len(toks) else ""
        prev = toks[i - 1] if i else ""
        if tok in _FUNCTION or not tok[0].isalnum():
            flush()
        elif _is_verb(tok):
            # A participle between a determiner/modifier and a content word modifies it ("a parked car").
            modifies = nxt and nxt not in _FUNCTION and not _is_verb(nxt) and (prev in _DETERMINERS or cur)
            if modifies:
                cur.append(tok)
            else:
                flush()
        elif tok.isdigit():
            flush()
        else:
            cur.append(tok)
    flush()
    seen, out = set(), []
    for p in phrases:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


_DT = _DETERMINERS - {"lots", "lot", "plenty", "number", "couple", "pair", "group", "bunch", "much", "more", "most",
                     "other", "many", "few", "several"}  # fmt: skip
_NUMBERS = set("one two three four five six seven eight nine ten eleven twelve".split())
_PREPOSITIONS = set(
    "on in at of with without under over near by from behind above below beside besides into onto upon through "
    "across along around inside outside against between toward towards down up off out for while as like during "
    "after before past beneath underneath atop amongst among via about than if because whilst".split()
)
_PRONOUNS = set("it he she they them him we us i you me itself themselves".split())
_POSSESSIVE = set("his her their its my your our".split())
_BE = set(
    "is are was were be been being am has have had do does did will would can could should may might must".split()
)
_ADVERBS = set("very too also just not only still together almost nearly away back here then so".split())
_TOKEN = re.compile(r"[A-Za-z0-9]+(?:['-][A-Za-z0-9]+)*|[^\sA-Za-z0-9]")


def heuristic_tags(caption: str) -> list[tuple[str, str]]:
    """(token, Penn tag) of a caption, case kept, punctuation its own token (as nltk's
    ``word_tokenize``): determiners DT, numbers CD, prepositions IN, ``to`` TO, conjunctions CC,
    pronouns PRP / PRP$, verb forms VB*, adverbs RB, the adjectives of caption language JJ, other
    words NN / NNS. Written for :func:`official_phrases` offline; nltk's tagger is used when installed.
    """
    out = []
    for tok in _TOKEN.findall(caption):
        low = tok.lower()
        if not tok[0].isalnum():
            tag = tok
        elif low.isdigit() or low in _NUMBERS:
            tag = "CD"
        elif low in _DT:
            tag = "DT"
        elif low == "to":
            tag = "TO"
        elif low in ("and", "or", "but", "nor"):
            tag = "CC"
        elif low in _PRONOUNS:
            tag = "PRP"
        elif low in _POSSESSIVE:
            tag = "PRP$"
        elif low in _BE:
            tag = "VBZ"
        elif low in _PREPOSITIONS:
            tag = "IN"
        elif low in _ADVERBS:
            tag = "RB"
        elif low in ("there",):
            tag = "EX"
        elif low in ("who", "which", "what", "that", "whose", "where", "when", "how", "why"):
            tag = "WDT"
        elif low in _ADJECTIVES or low == "next":  # "next to": nltk's JJ
            tag = "JJ"
        elif low in ("top", "front", "side", "bottom", "middle"):  # nouns that our verb list holds
            tag = "NN"
        elif _is_verb(low):
            tag = "VBG" if low.endswith("ing") else "VBN" if low.endswith("ed") else "VBZ"
        else:
            tag = "NNS" if low.endswith("s") and not low.endswith("ss") else "NN"
        out.append((tok, tag))
    return out


def _nbar_chunks(tagged: list[tuple[str, str]]) -> list:
    """NBAR: {<NN.*|JJ>*<NN.*>} as nltk's RegexpParser applies it: in each maximal run of NN.* / JJ
    tokens, the run up to its last noun is one chunk (a list of tokens); other tokens stay (token, tag).
    """
    out, i = [], 0
    while i < len(tagged):
        j = i
        while j < len(tagged) and (tagged[j][1].startswith("NN") or tagged[j][1] == "JJ"):
            j += 1
        last = max((k for k in range(i, j) if tagged[k][1].startswith("NN")), default=None)
        if last is None:
            out.append(tagged[i])
            i += 1
            continue
        out.append([t for t, _ in tagged[i : last + 1]])
        out.extend(tagged[last + 1 : j])
        i = j
    return out


def _np_chunks(items: list, with_preposition: bool) -> list:
    """NP: {<NBAR><IN><NBAR>} (with prepositions, first) then {<NBAR>}: NBAR lists become NP strings."""
    out, i = [], 0
    while i < len(items):
        it = items[i]
        if (
            with_preposition
            and isinstance(it, list)
            and i + 2 < len(items)
            and isinstance(items[i + 1], tuple)
            and items[i + 1][1] == "IN"
            and isinstance(items[i + 2], list)
        ):
            out.append(" ".join([*it, items[i + 1][0], *items[i + 2]]))
            i += 3
        else:
            out.append(" ".join(it) if isinstance(it, list) else it)
            i += 1
    return out


def _official_loop(items: list) -> list[str]:
    """The official ``_get_phrase`` loop over the top-level chunks (NP strings) and tokens, quirks
    included: a phrase is emitted only when a token follows; the current phrase is reset only when
    it was new (so a repeated phrase merges with the next one).
    """
    phrases: list[str] = []
    current: list[str] = []
    for it in items:
        if isinstance(it, str):  # an NP
            current.append(it)
        elif current:
            entity = " ".join(current)
            if entity not in phrases:
                phrases.append(entity)
                current = []
    return phrases


def official_phrases(tagged: list[tuple[str, str]]) -> list[str]:
    """PARITY: the union of the official ``_get_phrase`` without and with prepositions, on
    (token, Penn tag) pairs (first-seen order; the official code returns ``list(set(...))``, and
    words are then sampled with replacement, so the order does not matter).
    """
    nbar = _nbar_chunks(tagged)
    out: list[str] = []
    for with_preposition in (False, True):
        for p in _official_loop(_np_chunks(nbar, with_preposition)):
            if p not in out:
                out.append(p)
    return out


def _nltk_available() -> bool:
    try:
        import nltk

        nltk.data.find("taggers/averaged_perceptron_tagger_eng")
        nltk.data.find("tokenizers/punkt_tab")
        return True
    except Exception:  # nltk missing or its data not downloaded: the offline chunker is used
        return False


def _nltk_tags(caption: str) -> list[tuple[str, str]]:
    import nltk

    return nltk.pos_tag(nltk.word_tokenize(caption))  # PARITY: the caption's own case


def _nltk(caption: str) -> list[str]:
    import nltk

    tagged = nltk.pos_tag(nltk.word_tokenize(caption.lower()))
    tree = nltk.RegexpParser("NP: {<JJ.*>*<NN.*>+}").parse(tagged)
    out = []
    for sub in tree.subtrees(lambda t: t.label() == "NP"):
        phrase = " ".join(w for w, _ in sub.leaves())
        if phrase not in out:
            out.append(phrase)
    return out


# DIVERGES(nouns) with rules=ours: our grammar, lower-cased, whole-caption fallback (the default follows the official rules)
def extract_nouns(caption: str, backend: str = "auto", rules: str = "official") -> list[str]:
    """Noun phrases of ``caption``.

    rules: ``official`` (PARITY, the module docstring: may be empty) or ``ours`` (maximal
    content-word runs, determiners dropped, lower case, order kept, no duplicates).
    backend: ``auto`` (nltk's tagger when its data is installed, else ours), ``heuristic`` or ``nltk``.
    """
    if rules not in ("official", "ours"):
        raise ValueError(f"rules must be 'official' or 'ours', got {rules!r}")
    use_nltk = backend == "nltk" or (backend == "auto" and _nltk_available())
    if rules == "official":
        return official_phrases(_nltk_tags(caption) if use_nltk else heuristic_tags(caption))
    return _nltk(caption) if use_nltk else _heuristic(caption)


class SampleWords:
    """Item transform for caption supervision: one random caption, its noun phrases, ``k_words`` of
    them sampled with replacement (K_word = 8, paper Sec. 4.1) -> ``item["words"]: list[str]``.

    PARITY (``rules=official``): a caption without a phrase gives ``k_words`` empty words, which the
    grounding loss masks out (``item["words_valid"] = False``). ``rules=ours`` falls back to the whole
    caption instead (DIVERGES(nouns)).
    """

    def __init__(self, k_words: int = 8, backend: str = "auto", rules: str = "official"):
        self.k_words, self.backend, self.rules = k_words, backend, rules

    def __call__(self, item: dict) -> dict:
        caps = [c for c in item.get("captions") or [] if c.strip()]
        if not caps:
            from odise_pl.errors import DatasetError

            raise DatasetError(
                f"image {item.get('file_name')} has no (non-empty) caption; caption supervision needs at least "
                "one per image: fix the captions file, or set data.on_bad_sample=skip to skip such images"
            )
        caption = random.choice(caps)
        nouns = extract_nouns(caption, self.backend, self.rules)
        if not nouns and self.rules == "ours":
            nouns = [caption.strip().rstrip(".")]
        item["words_valid"] = bool(nouns)
        nouns = nouns or [""]
        item["words"] = [random.choice(nouns) for _ in range(self.k_words)]
        return item


def main() -> None:
    """CLI: captions on stdin, one per line -> their phrases joined by `` | ``, one line each."""
    for line in sys.stdin:
        line = line.strip()
        if line:
            sys.stdout.write(" | ".join(extract_nouns(line)) + "\n")  # the command's output, not a message


if __name__ == "__main__":
    main()
