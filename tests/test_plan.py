import pytest

from comfy_mesh.splitter.errors import PlanError
from comfy_mesh.splitter.plan import BlockRange, Plan, PlanEntry, chain_split, tail_split


def test_tail_split_literal():
    plan = tail_split(56, 20, remote="gpu-b", epoch=3)
    assert plan.to_dict() == {"v": 1, "n_blocks": 56, "epoch": 3, "entries": [["local", [0, 36]], ["gpu-b", [36, 56]]]}
    assert plan.n_blocks_remote == 20 and plan.is_last("gpu-b") and not plan.is_last("local")


def test_tail_split_extremes():
    assert tail_split(5, 0).to_dict()["entries"] == [["local", [0, 5]]]
    assert tail_split(5, 0).is_last("local")
    assert tail_split(5, 5).to_dict()["entries"] == [["local", [0, 0]], ["remote", [0, 5]]]
    with pytest.raises(PlanError, match="n_blocks_remote must be in"):
        tail_split(5, 6)


def test_chain_split_literal():
    plan = chain_split(32, [("b", 10), ("c", 12)], epoch=1)
    assert plan.to_dict()["entries"] == [["local", [0, 10]], ["b", [10, 20]], ["c", [20, 32]]]
    with pytest.raises(PlanError):
        chain_split(5, [("b", 4), ("c", 2)])


def test_plan_round_trip_and_validation():
    plan = tail_split(8, 3, epoch=9)
    assert Plan.from_dict(plan.to_dict()) == plan
    with pytest.raises(PlanError, match="contiguous"):
        Plan(8, (PlanEntry("local", BlockRange(0, 4)), PlanEntry("x", BlockRange(5, 8))))
    with pytest.raises(PlanError, match="starts with the local"):
        Plan(8, (PlanEntry("x", BlockRange(0, 8)),))
    with pytest.raises(PlanError, match="covers"):
        Plan(8, (PlanEntry("local", BlockRange(0, 7)),))
    with pytest.raises(PlanError, match="version"):
        Plan.from_dict({"v": 99, "n_blocks": 8, "epoch": 0, "entries": []})
    with pytest.raises(PlanError, match="malformed"):
        Plan.from_dict({"v": 1, "n_blocks": 8, "epoch": 0, "entries": [["local"]]})
    with pytest.raises(PlanError):
        BlockRange(3, 2)


def test_block_range_is_half_open():
    r = BlockRange(2, 5)
    assert list(r) == [2, 3, 4] and len(r) == 3 and 5 not in r and 2 in r and str(r) == "[2, 5)"
