"""Rareness-based path selection on hand-built graphs: exact regularity scores and their ranking."""
import math

import pytest

from repnet import RepnetError
from repnet.proviot.graph import graph_from_edges
from repnet.proviot.paths import FrequencyDB, rarest_paths, regularity


def benign_windows():
    """Four windows of A -X-> B -Y-> C; two of them also B -Z-> D."""
    ws = []
    for i in range(4):
        rows = [(1, "p:a", "A", "X", "p:b", "B"), (2, "p:b", "B", "Y", "f:c", "C")]
        if i < 2:
            rows.append((3, "p:b", "B", "Z", "f:d", "D"))
        ws.append(graph_from_edges(rows))
    return ws


def test_frequency_db_by_hand():
    db = FrequencyDB.build(benign_windows())
    assert db.windows == 4 and db.eps == pytest.approx(1 / 5)
    assert db.transition("A", "X", "B") == 1.0  # H(e) = 4 of H_out(A) = 4
    assert db.transition("B", "Y", "C") == 1.0
    assert db.transition("B", "Z", "D") == 0.5  # 2 of 4
    assert db.transition("B", "W", "E") == pytest.approx(0.2)  # unseen: eps
    assert db.out_score("B") == 0.5  # out-degree 2 in two windows, 1 in two
    assert db.in_score("B") == db.in_score("C") == db.out_score("A") == 1.0
    assert db.in_score("E") == pytest.approx(0.2)  # unseen node: eps


def test_rare_path_ranks_above_frequent_one_by_exact_score():
    db = FrequencyDB.build(benign_windows())
    g = graph_from_edges([(1, "p:a", "A", "X", "p:b", "B"), (2, "p:b", "B", "Y", "f:c", "C"),
                          (3, "p:b", "B", "Z", "f:d", "D"), (4, "p:b", "B", "W", "f:e", "E")])
    paths = rarest_paths(g, db, k=4)
    texts = [p.text() for p in paths]
    # R = prod OUT(src) M(e) IN(dst):  A-X->B: 1*1*1;  B-Y->C: .5*1*1;  B-Z->D: .5*.5*1;  B-W->E: .5*.2*.2
    expected = [("A X B W E", 0.5 * 0.2 * 0.2), ("A X B Z D", 0.5 * 0.5), ("A X B Y C", 0.5), ("A X B", 1.0)]
    assert texts == [t for t, _ in expected]
    for p, (_, r) in zip(paths, expected):
        assert p.regularity == pytest.approx(r, rel=1e-12)
        assert p.log_regularity == pytest.approx(regularity(db, p.labels, p.types), rel=1e-12)
    assert rarest_paths(g, db, k=2)[0].text() == "A X B W E"
    assert math.isclose(paths[0].regularity, 0.02)


def test_paths_follow_causal_order():
    db = FrequencyDB.build(benign_windows())
    # B wrote C before A created B: A X B Y C is not a causal path
    g = graph_from_edges([(2, "p:a", "A", "X", "p:b", "B"), (1, "p:b", "B", "Y", "f:c", "C")])
    texts = [p.text() for p in rarest_paths(g, db, k=5)]
    assert "A X B Y C" not in texts and texts == ["B Y C", "A X B"]


def test_max_len_and_bad_arguments():
    db = FrequencyDB.build(benign_windows())
    g = graph_from_edges([(1, "p:a", "A", "X", "p:b", "B"), (2, "p:b", "B", "Y", "f:c", "C")])
    assert [p.text() for p in rarest_paths(g, db, k=5, max_len=1)] == ["A X B"]
    with pytest.raises(RepnetError):
        rarest_paths(g, db, k=0)
    with pytest.raises(RepnetError, match="benign set is empty"):
        FrequencyDB.build([])


def test_db_round_trips():
    db = FrequencyDB.build(benign_windows())
    back = FrequencyDB.from_dict(db.to_dict())
    for s, e, d in [("A", "X", "B"), ("B", "Z", "D"), ("B", "W", "E")]:
        assert back.edge_weight(s, e, d) == db.edge_weight(s, e, d)
