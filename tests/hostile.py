"""Text that breaks a page that does not escape it: markup that closes a script or a style,
elements whose handlers run script, line and paragraph separators, a right-to-left override
and NUL. A script or handler that runs sets ``document.title`` to ``PWNED`` (the handlers
need no quotes: a JSON string escapes ``"`` but not what they hold)."""

PWNED = "pwned"

HOSTILE = [
    f"</script><script>document.title='{PWNED}'</script>",
    f"<img src=x onerror=document.title=this.alt alt={PWNED}>",
    f"\"'><svg onload=document.title=this.id id={PWNED}>",
    "</style><!--",
    "a\u2028b\u2029c",
    "\u202eevil\u202c",
    "nul\x00byte",
]
"""The hostile strings, each a few GPT-2 tokens (about 70 in all). GPT-2 splits U+2028,
U+2029 and the override into bytes, each token drawn as U+FFFD: those reach a page in
labels and titles."""

LABEL = f"</script><img src=x onerror=document.title=this.alt alt={PWNED}>\u2028\u2029\u202e"
"""A hostile run label."""

TITLE = f"\"'><svg onload=document.title=this.id id={PWNED}></style>\u2028\x00"
"""A hostile chart title."""

MARKUP = ("</script", "<img", "<svg", "</style", "<!--")
"""What must not appear raw where data is written into a page."""


def build_hostile_warehouse(build_warehouse, tmp_path_factory):
    """A warehouse (``build_warehouse``, built once per session) of two runs of the tiny
    checkpoint over a corpus of ``HOSTILE`` strings: ``hostile`` (every measure group, 2
    sequences of 48 tokens: each string occurs) and ``plain`` (the entropies, 1 sequence of
    16 tokens; the same model, so it is compared with ``hostile``)."""
    folder = tmp_path_factory.getbasetemp() / "hostile-corpus"  # one path per session
    folder.mkdir(exist_ok=True)
    corpus = folder / "hostile.txt"
    corpus.write_text((" ".join(HOSTILE) + " The harbour wall.\n") * 4, encoding="utf-8")
    return build_warehouse(
        "hostile-html",
        ["--dataset", "text", "--data-files", str(corpus), "--n-batches", "1",
         "--batch-size", "2", "--seq-len", "48", "--measures", "all", "--run-id", "hostile"],
        ["--dataset", "text", "--data-files", str(corpus), "--n-batches", "1",
         "--batch-size", "1", "--seq-len", "16", "--measures", "entropy", "--run-id", "plain"])
