"""Nouns / noun phrases of a caption, offline.

The official code chunks captions with nltk's tagger, whose model is a run-time download that
fails offline. This module uses nltk when its tagger data is installed, and otherwise a
dependency-free chunker written for caption language (short descriptive sentences): a noun
phrase is a maximal run of content words between function words and verb forms, with its
determiner dropped (``a red car parked on the street`` -> ``red car | street``). Its precision and
recall on hand-labelled captions are measured in ``tests/test_nouns.py`` and quoted in the README.

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


def _nltk_available() -> bool:
    try:
        import nltk

        nltk.data.find("taggers/averaged_perceptron_tagger_eng")
        nltk.data.find("tokenizers/punkt_tab")
        return True
    except Exception:  # nltk missing or its data not downloaded: the offline chunker is used
        return False


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


# DIVERGES(nouns): our grammar, lower-cased, whole-caption fallback (SampleWords); official: NBAR + "NBAR IN NBAR", case kept, "" masked
def extract_nouns(caption: str, backend: str = "auto") -> list[str]:
    """Noun phrases of ``caption`` (determiners dropped, order kept, no duplicates).

    backend: ``auto`` (nltk when its tagger data is installed, else the offline chunker),
    ``heuristic`` or ``nltk``.
    """
    if backend == "nltk" or (backend == "auto" and _nltk_available()):
        return _nltk(caption)
    return _heuristic(caption)


class SampleWords:
    """Item transform for caption supervision: one random caption, its nouns, ``k_words`` of them
    sampled with replacement (K_word = 8, paper Sec. 4.1) -> ``item["words"]: list[str]``.

    A caption with no noun phrase falls back to the whole caption (so the image still has text).
    """

    def __init__(self, k_words: int = 8, backend: str = "auto"):
        self.k_words, self.backend = k_words, backend

    def __call__(self, item: dict) -> dict:
        caps = [c for c in item.get("captions") or [] if c.strip()]
        if not caps:
            from odise_pl.errors import DatasetError

            raise DatasetError(
                f"image {item.get('file_name')} has no (non-empty) caption; caption supervision needs at least "
                "one per image: fix the captions file, or set data.on_bad_sample=skip to skip such images"
            )
        caption = random.choice(caps)
        nouns = extract_nouns(caption, self.backend) or [caption.strip().rstrip(".")]
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
