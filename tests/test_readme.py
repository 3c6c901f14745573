"""The README's library snippets run as written."""
import re
from pathlib import Path

import torch

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


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
