"""The README's library snippets run as written; its summary table says what the results files say."""
import json
import re
from pathlib import Path

import torch

README_DIR = Path(__file__).resolve().parents[1]
README = (README_DIR / "README.md").read_text()


def snippets(section: str) -> list[str]:
    body = README.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_library_use_snippets_run():
    loop, pieces = snippets("Library use")
    x, y = torch.randn(4, 3, 224, 224), torch.randint(0, 100, (4,))
    scope = {"loader": [(x, y)]}
    exec(loop, scope)
    assert torch.isfinite(scope["out"].loss) and scope["out"].x_mixed.shape == x.shape
    model = scope["timm"].create_model("deit_small_patch16_224", num_classes=100).eval()
    scope.update(model=model, x=x)
    with torch.no_grad():
        exec(pieces, scope)
    assert scope["ro"].attn.shape == (4, 1 + 196 - sum(model.tome.r[:8]))
    assert scope["keep"].sum(1).tolist() == [117.0] * 4


GLANCE_METHODS = {"MergeMix (defaults)": "mergemix", "MergeMix, equal time": "mergemix[equal time]", "no mixing": "none",
                  "CutMix": "cutmix", "MixUp": "mixup"}


def test_at_a_glance_table_matches_the_published_results():
    """Each cell of the Benchmarks summary is its results file's mean top-1 / ECE, rounded once."""
    body = README.split("**At a glance**", 1)[1].split("\n\n", 2)[1]
    header, *rows = [[c.strip() for c in line.strip("|").split("|")]
                     for line in body.splitlines() if not line.startswith("|---")]
    assert len(rows) >= 5
    for row in rows:
        (results,) = re.findall(r"\]\((benchmarks/results/[^)]+)\.md\)", row[0])
        table = json.loads((README_DIR / f"{results}.json").read_text())["table"]
        for column, cell in zip(header[1:], row[1:]):
            method = GLANCE_METHODS[column]
            if cell == "–":
                assert method not in table, (results, method)
                continue
            top1, ece = (v.strip("* ") for v in cell.split("/"))
            assert (top1, ece) == (f"{table[method]['top1']:.2f}", f"{table[method]['ece']:.3f}"), (results, method)
