import pytest

from prophet.errors import ConfigError
from prophet.policies import FIFO, LFU, LRU, ScoredPolicy, make_policy


def test_lru_evicts_least_recently_used():
    p = LRU()
    for k in [(0, 0), (0, 1), (0, 2)]:
        p.insert(k)
    p.touch((0, 0))
    assert p.victim([(0, 0), (0, 1), (0, 2)]) == (0, 1)
    assert p.victim([(0, 0), (0, 2)]) == (0, 2)


def test_fifo_ignores_uses():
    p = FIFO()
    for k in [(0, 0), (0, 1)]:
        p.insert(k)
    p.touch((0, 0))
    assert p.victim([(0, 0), (0, 1)]) == (0, 0)


def test_lfu_counts_survive_eviction_and_ties_go_to_older():
    p = LFU()
    for k in [(0, 0), (0, 1), (0, 2)]:
        p.insert(k)
    for _ in range(3):
        p.touch((0, 0))
    p.touch((0, 1))
    p.touch((0, 2))
    assert p.victim([(0, 0), (0, 1), (0, 2)]) == (0, 1)
    p.remove((0, 0))
    p.insert((0, 0))  # back again: its three uses still count
    assert p.victim([(0, 0), (0, 2)]) == (0, 2)


def test_scored_policy_evicts_lowest_score_and_breaks_ties_by_base():
    scores = {(0, 0): 0.9, (0, 1): 0.1, (0, 2): 0.1}
    p = ScoredPolicy(lambda k: scores[k])
    for k in scores:
        p.insert(k)
    p.touch((0, 1))
    assert p.victim(list(scores)) == (0, 2)


def test_make_policy_names_the_choices():
    assert isinstance(make_policy("lfu"), LFU)
    with pytest.raises(ConfigError, match="lru"):
        make_policy("mru")
