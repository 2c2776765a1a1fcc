"""mdf_mllm/export.py: the examples the card and the demo show."""


def test_the_examples_are_own_histories_then_a_phenocopy_and_an_age_swap_pair():
    import datasets

    from mdf_mllm import export

    test = datasets.Dataset.from_dict({"label": [0, 0, 1, 2, 1], "text": ["", "own a", "own b", "own c", ""],
                                       "case_id": list("vwxyz"), "file_name": [f"{c}.png" for c in "vwxyz"]})
    counterfactual = {"photos": [
        {"case_id": "v", "file_name": "v.png", "kind": "photo decides", "text": "misleading", "points_to": ["b"]},
        {"case_id": "x", "file_name": "x.png", "kind": "phenocopy", "text": "twin's history", "points_to": ["c"]},
        {"case_id": "z", "file_name": "z.png", "kind": "phenocopy", "text": "twin of z", "points_to": ["a"]},
        {"case_id": "y", "file_name": "y.png", "kind": "age swap", "text": "older", "points_to": ["a"]}]}
    examples = export.example_inputs(test, counterfactual, ["a", "b", "c"], count=3)
    # The phenocopy: z, not shown yet, before x; the age swap: y, the only one, although shown.
    assert [(e["index"], e["text"]) for e in examples] == [(1, "own a"), (2, "own b"), (3, "own c"), (4, ""),
                                                           (4, "twin of z"), (3, "own c"), (3, "older")]
    assert examples[4]["title"] == "phenocopy: the same photo, a a history"
    assert examples[6]["title"] == "age swap: the same photo, the age of a's stage"
    # Without a counterfactual table (real data), only own histories; a class without one comes with none.
    assert [(e["index"], e["text"]) for e in export.example_inputs(test.select([0, 2]), {}, ["a", "b", "c"])] == [
        (1, "own b"), (0, "")]
