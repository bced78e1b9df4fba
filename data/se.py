"""StackExchange preference rows -> canonical records, with the reference's HTML cleaning and 1 % test split.

    from data.se import load_se, clean_html
    records = load_se("test")                             # hub dataset HuggingFaceH4/stack-exchange-preferences
    records = load_se("train", files=["se-*.parquet"])    # local copies of the hub's single (train) split
    clean_html("<p>Hi <b>x</b> there</p><pre><code>a=1</code></pre>")  # 'Hi  there\\n\\n<code>a=1</code>'

The hub has one split. Its rows are shuffled with `datasets.Dataset.shuffle(seed=42)`; "test" is the first 1 % (rounded
down) and "train" the rest. Local files must hold all the original rows, in order, so the split matches the hub's.
A row has `question` (HTML) and `answers`, a list of `{"text": HTML, "pm_score": number}`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from bs4 import BeautifulSoup, NavigableString, Tag

from data.files import DataError, iter_rows, resolve_paths, require_number, require_str

if TYPE_CHECKING:
    from data.records import Record

HUB_NAME = "HuggingFaceH4/stack-exchange-preferences"
SPLIT_SEED = 42
TEST_FRACTION = 0.01
CLEAN_CHUNK = 256  # documents per task sent to a cleaning process


def clean_html(html: str) -> str:
    """Keep the direct text of top-level <p>, each <code> inside a top-level <pre> and each top-level <code> (the last two
    wrapped in <code>...</code>), blank-line joined.

    Everything else is dropped: text outside any tag, other tags, and text inside tags nested in a <p> (links, <b>,
    even a nested <p>). HTML comments directly inside a <p> count as its text; entities are decoded (&nbsp; -> \\xa0).
    """
    parts = []
    for element in BeautifulSoup(html, "html.parser").children:
        if not isinstance(element, Tag):
            continue
        if element.name == "p":
            # NavigableString includes Comment, so comment text inside a <p> is kept.
            parts.append("".join(str(child) for child in element.children if isinstance(child, NavigableString)))
        elif element.name == "pre":
            parts.extend("<code>" + code.get_text() + "</code>" for code in element.find_all("code"))
        elif element.name == "code":
            parts.append("<code>" + element.get_text() + "</code>")  # like code in a <pre>: the tags stay
    return "\n\n".join(parts)


def se_records(rows: Iterable[tuple[str, dict]], num_proc: int | None = None) -> dict[str, Record]:
    """Records of already-split rows; a question that cleans to an earlier one's text replaces its content in place.

    The rows are checked first (the first bad row stops everything), then all HTML is cleaned, in `num_proc` processes
    when given (the reference used 64: cleaning is about 0.26 ms per document, 2.4 h on one core for the 10.8M rows).
    """
    checked = []  # (question html, [answer html], [score])
    for where, row in rows:
        question = require_str(where, row, "question")
        answers = row.get("answers")
        if not isinstance(answers, list):
            raise DataError(f"{where}: field 'answers' must be a list of {{'text', 'pm_score'}} objects")
        if not answers:
            raise DataError(f"{where}: 'answers' is empty")
        texts, scores = [], []
        for k, answer in enumerate(answers):
            if not isinstance(answer, dict):
                raise DataError(f"{where}: answers[{k}] must be an object with 'text' and 'pm_score'")
            texts.append(require_str(f"{where} answers[{k}]", answer, "text"))
            scores.append(require_number(f"{where} answers[{k}]", answer, "pm_score"))
        checked.append((question, texts, scores))
    cleaned = iter(clean_all([html for question, texts, _ in checked for html in (question, *texts)], num_proc))
    records: dict[str, Record] = {}
    for _, texts, scores in checked:
        prompt = "\n\nHuman: " + next(cleaned) + "\n\nAssistant:"
        responses = [" " + next(cleaned) for _ in texts]
        # All i < j; strictly higher score wins, a tie prefers the later answer j.
        n = len(responses)
        pairs = [(i, j) if scores[i] > scores[j] else (j, i) for i in range(n) for j in range(i + 1, n)]
        # A response text that repeats is ranked by the score of its first occurrence; max() keeps the first on ties.
        sft_target = max(responses, key=lambda text: scores[responses.index(text)])
        records[prompt] = {"responses": responses, "pairs": pairs, "sft_target": sft_target}
    return records


def clean_all(htmls: list[str], num_proc: int | None) -> list[str]:
    """clean_html of each, in order; several processes (forked: the workers need only this module) for large inputs."""
    if not num_proc or num_proc <= 1 or len(htmls) < 4 * CLEAN_CHUNK:
        return [clean_html(h) for h in htmls]
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(num_proc) as pool:
        return pool.map(clean_html, htmls, chunksize=CLEAN_CHUNK)


def split_indices(n_rows: int, split: str) -> list[int]:
    """Row indices of `split` after `Dataset.shuffle(seed=42)` of `n_rows` rows: test = first 1 %, train = the rest."""
    import datasets  # imported here: slow

    if split not in ("train", "test"):
        raise ValueError(f"se has splits 'train' and 'test', got {split!r}")
    # Shuffling an index column gives exactly the permutation the same call applies to the real rows.
    order = datasets.Dataset.from_dict({"i": list(range(n_rows))}).shuffle(seed=SPLIT_SEED)["i"]
    n_test = int(n_rows * TEST_FRACTION)
    return list(order[:n_test] if split == "test" else order[n_test:])


def load_se(split: str, files: list[str] | None = None, cache_dir: str | None = None,
            num_proc: int | None = None) -> dict[str, Record]:
    """Records of split "train" or "test", carved from the single hub split (files=None) or from local copies of it."""
    if files is not None:
        rows = list(iter_rows(resolve_paths(files)))
        return se_records((rows[i] for i in split_indices(len(rows), split)), num_proc)
    import datasets  # imported here: slow, and only the hub path needs it

    if split not in ("train", "test"):
        raise ValueError(f"se has splits 'train' and 'test', got {split!r}")
    dataset = datasets.load_dataset(HUB_NAME, split="train", cache_dir=cache_dir)
    n_test = int(len(dataset) * TEST_FRACTION)
    shuffled = dataset.shuffle(seed=SPLIT_SEED)
    part = shuffled.select(range(n_test)) if split == "test" else shuffled.select(range(n_test, len(dataset)))
    return se_records(((f"{HUB_NAME}:{split} row {i}", row) for i, row in enumerate(part)), num_proc)
