"""What the spawned ranks of test_reader.py run: a lean module (torch and the loader only), so that
each rank starts fast."""
import torch
import torch.distributed as dist

from paradit.models.loading import load_transformer
from paradit.parallel.weights import SharedRead


def shared_load(folder: str) -> dict:
    """This rank's share read from the files, the rest by broadcast; compared with a plain load."""
    stats = {}
    model = load_transformer(folder, shared=SharedRead(dist.group.WORLD), stats=stats)
    plain = load_transformer(folder)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    return {"same": same, "bytes": stats["bytes"], "received": stats["received_bytes"],
            "keys": list(model.state_dict()) == list(plain.state_dict())}
