"""The chatterbot-corpus conversations (BSD-3-Clause), read from the installed package."""

from __future__ import annotations

from pathlib import Path

import yaml

from lmpipe.taskdata.conversations import Conversation


def chatterbot_dir(language: str) -> Path:
    try:
        import chatterbot_corpus
    except ImportError as exc:
        raise FileNotFoundError(
            "finetune.dataset=chatterbot needs `pip install chatterbot-corpus`"
        ) from exc
    path = Path(chatterbot_corpus.__file__).parent / "data" / language
    if not path.is_dir():
        raise FileNotFoundError(
            f"finetune.language: chatterbot-corpus has no '{language}' data ({path})"
        )
    return path


def load_chatterbot(language: str = "english") -> list[Conversation]:
    """Each chatterbot conversation [q, a, q2, a2, ...] becomes alternating user/assistant turns."""
    conversations = []
    for path in sorted(chatterbot_dir(language).glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for index, turns in enumerate(data.get("conversations") or []):
            texts = [str(t).strip() for t in turns if t is not None and str(t).strip()]
            if len(texts) < 2:
                continue
            texts = texts[: len(texts) // 2 * 2]  # end on an assistant turn
            messages = [
                {"role": "user" if i % 2 == 0 else "assistant", "content": text}
                for i, text in enumerate(texts)
            ]
            conversations.append(Conversation(f"chatterbot:{path.stem}:{index}", messages))
    return conversations
