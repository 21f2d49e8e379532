"""
dev/repeat_probe.py: the rates, the recommender's habit and the rankings check on a hand-worked
dialog, and the text probe on a case its words decide.

    python -m pytest tests/dev/test_repeat_probe.py -q
"""
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "dev"))
import repeat_probe  # noqa: E402


def turn(role, text, *items):
    return {"role": role, "text": text, "items": list(items)}


DIALOG = {"id": "x", "turns": [
    turn("assistant", "hi @{a}", "a"),             # t = 0: not a sample
    turn("user", "I loved @{b}", "b"),
    turn("assistant", "@{b} is great, try @{c}", "b", "c"),  # just named: b repeated (gold b), c new
    turn("user", "ok"),
    turn("assistant", "then @{d}", "d"),           # the seeker named nothing just before
    turn("user", "seen @{c} and @{e}", "c", "e"),
    turn("assistant", "@{f}", "f"),                # just named (latest e), no repeat, one repeat before
]}


def test_rates_and_habit_by_hand():
    # samples: t2 b (named before: b), t2 c, t4 d, t6 f -> 4, one repeat; just-named: t2 b, t2 c, t6 f, gold b once
    assert repeat_probe.split_rates([DIALOG]) == (4, 0.25, 3, 1 / 3)
    rows = repeat_probe.just_named(DIALOG)
    assert [(t, item, r) for t, item, _, r in rows] == [(2, "b", 0), (6, "e", 1)]
    assert "u:loved" in rows[0][2] and "r:hi" in rows[0][2] and "u:i_loved" in rows[0][2]
    assert repeat_probe.habit(repeat_probe.turn_rows([DIALOG])) == {0: (1, 1.0), 1: (1, 0.0)}


def test_rankings_check_by_hand():
    dialogs = {"x": DIALOG}
    rows = [{"dialog": "x", "turn": 2, "gold": "b", "top": [["c", math.log(0.5)], ["b", math.log(0.2)]]},
            {"dialog": "x", "turn": 2, "gold": "c", "top": [["c", math.log(0.5)], ["b", math.log(0.2)]]},
            {"dialog": "x", "turn": 4, "gold": "d", "top": [["d", math.log(0.9)]]},
            {"dialog": "x", "turn": 6, "gold": "f", "top": [["e", math.log(0.3)], ["g", math.log(0.1)]]}]
    m = repeat_probe.rankings_check(dialogs, rows)
    assert m["samples"] == 4 and m["just_named"] == 3
    assert math.isclose(m["p_latest"], 0.2 + 0.2 + 0.3) and m["gold_latest"] == 1
    # the best item the dialog has not named yet: c at t2 (twice), g at t6 (c and e are named by then)
    assert math.isclose(m["p_new"], 0.5 + 0.5 + 0.1) and m["gold_new"] == 1
    assert m["r1"] == 2 and m["r1_latest_first"] == 2  # c and d as is; b and d with the latest first


def test_probe_reads_words_that_decide():
    yes = turn("user", "I loved @{b}, have you seen it?", "b")
    no = turn("user", "never heard of @{b}", "b")
    dialogs = [{"id": str(k), "turns": [turn("assistant", "hello"), u, turn("assistant", "@{b}" if u is yes else "@{c}", "b" if u is yes else "c")]}
               for k, u in enumerate([yes, no] * 10)]
    rows = repeat_probe.turn_rows(dialogs)
    assert [y for _, _, y in rows] == [1, 0] * 10
    assert repeat_probe.probe(rows, rows, 1.0) == 1.0
    assert repeat_probe.auc(repeat_probe.torch.tensor([0.1, 0.1]), repeat_probe.torch.tensor([1, 0])) == 0.5
