"""The fallback nbval run's plugin: a badge and a WARNING line compare as one status.

nbformat (which the plugin imports too) is imported where it is used, not at collection:
it takes about 2 s (jsonschema's format checkers), which every process of ``make test-unit``
would pay.
"""

from __future__ import annotations


def badge(text: str) -> dict:
    import nbformat

    return nbformat.from_dict({"output_type": "display_data", "metadata": {}, "data": {
        "text/plain": text, "text/html": "<div class='gvisor-magic-badge'>…</div>"}})


def stream(name: str, text: str) -> dict:
    import nbformat

    return nbformat.from_dict({"output_type": "stream", "name": name, "text": text})


def test_a_badge_and_a_warning_line_become_the_same_entry() -> None:
    from support.nbval_status_shape import KEY, canonical

    saved = canonical([stream("stdout", "hi\n"), badge("[gvisor-magic] runsc (gVisor): exit 0")])
    fallback = canonical([stream("stdout", "hi\n"), stream(
        "stderr", "[gvisor-magic] WARNING: subprocess (NOT isolated): exit 0 in 0.05s, "
                  "network ON; fallback: mode 'subprocess' was requested\n")])
    assert [o.get("output_type") for o in fallback] == ["stream", "display_data"]
    assert saved[0] == fallback[0]
    assert saved[1]["data"][KEY] == "runsc (gVisor): exit 0"
    assert fallback[1]["data"][KEY] == "subprocess (NOT isolated): exit 0"


def test_how_it_ended_still_counts_and_other_stderr_is_kept() -> None:
    from support.nbval_status_shape import KEY, canonical

    ended = canonical([stream("stderr", "oops\n[gvisor-magic] WARNING: subprocess (NOT "
                                         "isolated): exit 3 in 0.01s\n")])
    assert ended[0]["text"] == "oops\n"
    assert ended[1]["data"][KEY] == "subprocess (NOT isolated): exit 3"
    assert canonical([badge("[gvisor-magic] runsc (gVisor): exit 0")])[0]["data"][KEY] != \
        ended[1]["data"][KEY].replace("subprocess (NOT isolated)", "runsc (gVisor)")
