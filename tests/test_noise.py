"""Label noise for verifiable training data (lmpipe.taskdata.noise): how many replies go bad,
which, how, that val and test never do, and the settings it refuses."""

from __future__ import annotations

import pytest

from lmpipe.feedback.judge import judge
from lmpipe.runs.config import ConfigError, FinetuneConfig, validate
from lmpipe.taskdata.conversations import Conversation
from lmpipe.taskdata.noise import with_noise, wrong_answer_reply
from lmpipe.tasks.sft import conversation_splits


def test_a_wrong_answer_changes_the_final_line_and_the_step_that_states_it() -> None:
    bad = wrong_answer_reply("7 + 5 = 12\n12 - 3 = 9\n#### 9", "id", 0)
    head, final = bad.rsplit("\n", 1)
    wrong = final.removeprefix("#### ")
    assert wrong != "9" and 1 <= abs(int(wrong) - 9) <= 3
    assert head == f"7 + 5 = 12\n12 - 3 = {wrong}"
    assert wrong_answer_reply("#### 4", "id", 0).startswith("#### ")
    with pytest.raises(ValueError, match="no '#### <answer>'"):
        wrong_answer_reply("four", "id", 0)


def conversations(n: int) -> list[Conversation]:
    return [Conversation(f"p{i}", [{"role": "user", "content": f"{i} + 1 ="},
                                   {"role": "assistant", "content": f"{i} + 1 = {i + 1}\n"
                                                                    f"#### {i + 1}"}],
                         answer=str(i + 1)) for i in range(n)]  # fmt: skip


@pytest.mark.parametrize("kind", ["wrong_answer", "other_reply"])
def test_the_share_asked_goes_bad_and_the_rest_is_untouched(kind: str) -> None:
    clean = conversations(40)
    noisy = with_noise(clean, 0.3, kind, seed=1)
    changed = [b for a, b in zip(clean, noisy, strict=True) if a != b]
    assert len(changed) == 12
    assert [c.id for c in noisy] == [c.id for c in clean]
    assert all(not judge(c.messages[1]["content"], c.answer).correct for c in changed)
    assert all(c.answer == a.answer for a, c in zip(clean, noisy, strict=True))
    assert with_noise(clean, 0.3, kind, seed=1) == noisy  # stable
    assert with_noise(clean, 0.3, kind, seed=2) != noisy  # the seed picks others
    assert with_noise(clean, 0.0, kind, seed=1) == clean


def test_noise_reaches_the_training_split_only() -> None:
    f = FinetuneConfig(dataset="reasoning_gym")
    f.reasoning_gym.train_size, f.reasoning_gym.val_size, f.reasoning_gym.test_size = 50, 10, 10
    f.reasoning_gym.worked = True
    clean = conversation_splits(f)
    f.reasoning_gym.noise_share = 0.5
    noisy = conversation_splits(f)
    wrong = [c for c in noisy["train"] if not judge(c.messages[1]["content"], c.answer).correct]
    assert len(wrong) == 25
    assert noisy["val"] == clean["val"] and noisy["test"] == clean["test"]


@pytest.mark.parametrize(
    ("settings", "pattern"),
    [({"noise_share": 1.5}, "noise_share"), ({"noise_kind": "swap"}, "noise_kind")],
)
def test_bad_noise_settings_name_the_key(settings: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        validate({"finetune": {"reasoning_gym": settings}})
