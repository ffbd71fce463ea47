"""Tiny models with synthetic tasks whose right merge is known, shared by the merge tests."""
from __future__ import annotations

import torch
from torch import nn

IN, BRANCH, CLASSES = 12, 16, 4


class BranchNet(nn.Module):
    """One branch per task: features = concat of the branches' outputs."""

    def __init__(self, branches: int):
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(nn.Linear(IN, BRANCH), nn.Tanh(),
                                                    nn.Linear(BRANCH, BRANCH)) for _ in range(branches))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))  # carried, never merged

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], dim=1)


class BranchHead(nn.Module):
    """Task t's head reads branch t only."""

    def __init__(self, branch: int, branches: int):
        super().__init__()
        self.branch, self.linear = branch, nn.Linear(BRANCH, CLASSES)
        self.branches = branches

    def forward(self, features):
        return self.linear(features[:, self.branch * BRANCH:(self.branch + 1) * BRANCH])


def fine_tune(pretrained: nn.Module, head: nn.Module, x, y, params, steps=150, lr=3e-2):
    model = BranchNet(len(pretrained.branches))
    model.load_state_dict(pretrained.state_dict())
    chosen = [p for n, p in model.named_parameters() if any(n.startswith(q) for q in params)]
    opt = torch.optim.Adam(chosen + list(head.parameters()), lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(head(model(x)), y).backward()
        opt.step()
    return model


def make_tasks(num_tasks=4, examples=256, seed=0, conflict=False):
    """Tasks fine-tuned on disjoint branches; with conflict=True, one more task ("conflict")
    is fine-tuned on branch 0, the branch task 0 relies on, towards unrelated labels."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pretrained = BranchNet(num_tasks)
    finetuned, heads, data = {}, {}, {}
    jobs = [(f"task{t}", t, f"branches.{t}.") for t in range(num_tasks)]
    if conflict:
        jobs.append(("conflict", 0, "branches.0."))
    for name, branch, params in jobs:
        x = torch.randn(examples, IN, generator=g)
        y = (x @ torch.randn(IN, CLASSES, generator=g)).argmax(1)
        head = BranchHead(branch, num_tasks)
        finetuned[name] = fine_tune(pretrained, head, x, y, [params])
        heads[name], data[name] = head.requires_grad_(False), x
    return pretrained, finetuned, heads, data


@torch.no_grad()
def agreement(state_dict, finetuned, heads, data) -> dict[str, float]:
    """Per task: how often the merged model predicts what the task's own fine-tuned model does."""
    model = BranchNet(len(next(iter(finetuned.values())).branches))
    model.load_state_dict(state_dict)
    return {t: float((heads[t](model(data[t])).argmax(1) == heads[t](finetuned[t](data[t])).argmax(1))
                     .float().mean()) for t in finetuned}


class TinyViT(nn.Module):
    """A two-layer vision transformer on 8x8 single-channel images, 2x2 patches."""

    def __init__(self, dim=32):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, kernel_size=2, stride=2)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, pixel_values):
        tokens = self.patch(pixel_values).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], dim=1) + self.pos
        return self.norm(self.encoder(tokens)[:, 0])


def make_vit_tasks(num_tasks=3, examples=192, seed=0):
    """Each task labels images by a different random linear read-out of the pixels."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pretrained = TinyViT()
    finetuned, heads, data = {}, {}, {}
    for t in range(num_tasks):
        x = torch.randn(examples, 1, 8, 8, generator=g)
        y = (x.flatten(1) @ torch.randn(64, CLASSES, generator=g)).argmax(1)
        model, head = TinyViT(), nn.Linear(32, CLASSES)
        model.load_state_dict(pretrained.state_dict())
        opt = torch.optim.Adam(list(model.parameters()) + list(head.parameters()), 3e-3)
        for _ in range(120):
            opt.zero_grad()
            nn.functional.cross_entropy(head(model(x)), y).backward()
            opt.step()
        name = f"vit{t}"
        finetuned[name], heads[name] = model.eval(), head.requires_grad_(False)
        data[name] = [({"pixel_values": x[i:i + 64]}, y[i:i + 64]) for i in range(0, examples, 64)]
    return pretrained.eval(), finetuned, heads, data


def differing_mask_bits(a, b) -> tuple[int, int]:
    """(mask bits that differ, mask bits in all) between two maskfile.Masks of the same merge."""
    from calm_fast.ops import unpack_mask

    differing = total = 0
    for task, bits in a.bits.items():
        for key, want in bits.items():
            numel = torch.Size(a.parameters[key]).numel()
            differing += int((unpack_mask(b.bits[task][key], numel) != unpack_mask(want, numel)).sum())
            total += numel
    return differing, total
