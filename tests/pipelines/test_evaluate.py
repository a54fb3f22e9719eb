"""Zero-shot scoring: balanced prompt ensembles, best prompt per class."""

from collections import Counter

import numpy as np

from pipelines.data.write import shapesworld
from pipelines.eval.evaluate import class_prompts, class_scores


def test_prompts_cover_every_combination_of_the_other_attributes_equally():
    prompts = class_prompts("shape", "circle")
    assert len(prompts) == 4 * 2 * 4 * 3  # color x size x direction x rhythm
    assert all("circle" in p for p in prompts)
    colors = Counter(c for p in prompts for c in shapesworld.ATTRIBUTES["color"] if f" {c}" in p.lower())
    assert set(colors.values()) == {len(prompts) // 4}


def test_pitch_follows_the_colour_in_colour_prompts():
    assert all("red" in p.lower() for p in class_prompts("color", "red"))
    assert all("low" in p.lower() or "deep" in p.lower() for p in class_prompts("color", "red"))
    assert not any("shrill" in p.lower() for p in class_prompts("color", "red"))


def test_best_prompt_wins_where_the_mean_of_prompts_would_not():
    e = np.eye(4, dtype=np.float32)
    item = e[:1]  # identical to class 0's first prompt
    classes = [e[:3], (0.6 * e[0] + 0.8 * e[3])[None]]
    assert class_scores(item, classes).argmax(1).tolist() == [0]
    means = np.stack([c.mean(0) / np.linalg.norm(c.mean(0)) for c in classes])
    assert (item @ means.T).argmax(1).tolist() == [1]  # why the mean is not used
