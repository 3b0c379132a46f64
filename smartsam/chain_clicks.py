"""The Next Chain Clickers' placement for every chain of a step at once, as tensor work.

The rule of :meth:`smartsam.clickers.NextChainClicker.place` (the chosen side of the mask, the
uncertain band, the largest 8-connected region, its distance-transform peak) for a batch of logit
maps, on whichever device holds them: a GPU agent need not bring each chain's logits to the host
and place its clicks one chain at a time. Exact, not approximate: the same integers and the same
tie rules as the OpenCV path (``tests/test_chain_clicks.py`` holds them equal), so both paths give
the same clicks, hence the same candidates.

All functions take ``(N, H, W)`` tensors (N maps, rows, columns) and keep their device.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

_EDT_CHUNK_BYTES = 64 << 20  # the brute-force row minimum works in pieces of about this size
_CHECK_EVERY = 4  # propagation rounds between convergence checks (each check waits for the device)


def component_labels(regions: torch.Tensor) -> torch.Tensor:
    """Label 8-connected components: ``(N, H, W)`` bool -> ``(N, H, W)`` int64 where each
    component's pixels carry its smallest row-major flat index and the background ``H * W``.

    Min-label propagation over the 3x3 neighbourhood with pointer jumping (a pixel's label is a
    pixel of its own component with a label no larger), until nothing changes.
    """
    n, h, w = regions.shape
    none = h * w
    idx = torch.arange(none, device=regions.device, dtype=torch.float32).view(1, h, w)
    # float32 for max_pool2d: flat indices stay exact below 2**24
    lab = torch.where(regions, idx, torch.tensor(float(none), device=regions.device))
    pad = torch.full((n, 1), float(none), device=regions.device)
    while True:
        before = lab
        for _ in range(_CHECK_EVERY):  # a converged labelling is a fixed point: extra rounds are harmless
            low = -F.max_pool2d(-lab[:, None], 3, stride=1, padding=1)[:, 0]
            flat = torch.where(regions, torch.minimum(lab, low), lab).reshape(n, -1)
            lab = torch.gather(torch.cat([flat, pad], 1), 1, flat.long()).view(n, h, w)
        if torch.equal(lab, before):  # the loop's one host synchronisation
            return lab.long()


def largest_components(regions: torch.Tensor) -> torch.Tensor:
    """Each map's largest 8-connected component, ``(N, H, W)`` bool (an empty map stays empty).

    Equal areas go to the component OpenCV numbers first (``cv2.connectedComponentsWithStats``
    scans 2x2 blocks in row-major order): the one whose first block comes first.
    """
    n, h, w = regions.shape
    none = h * w
    lab = component_labels(regions).reshape(n, -1)
    area = torch.zeros(n, none + 1, dtype=torch.int64, device=regions.device)
    area.scatter_add_(1, lab, torch.ones_like(lab))
    area[:, none] = 0
    ys, xs = torch.meshgrid(torch.arange(h, device=regions.device), torch.arange(w, device=regions.device), indexing="ij")
    block = ((ys // 2) * ((w + 1) // 2) + xs // 2).reshape(1, -1).expand(n, -1)
    first = torch.full((n, none + 1), none, dtype=torch.int64, device=regions.device)
    first.scatter_reduce_(1, lab, block, reduce="amin")
    best = torch.argmax(area * (none + 1) - first, dim=1)  # largest area, then earliest block
    return (lab == best[:, None]).view(n, h, w) & regions


def squared_distances(regions: torch.Tensor) -> torch.Tensor:
    """Exact squared Euclidean distance of every pixel to the nearest pixel outside its region,
    the image border counting as outside: ``(N, H, W)`` bool -> ``(N, H, W)`` int64 (0 outside).

    Two passes: along each column (the nearest outside pixel above and below), then the minimum
    over every column of ``dx^2 + dy^2``, and the left and right borders.
    """
    n, h, w = regions.shape
    dev = regions.device
    y = torch.arange(h, device=dev).view(1, h, 1)
    above = torch.cummax(torch.where(regions, -1, y), dim=1).values  # -1: the border above
    below = torch.flip(torch.cummin(torch.flip(torch.where(regions, h, y), [1]), dim=1).values, [1])  # h: below
    g2 = torch.minimum(y - above, below - y).square().reshape(n * h, w)
    x = torch.arange(w, device=dev)
    dx2 = (x[:, None] - x[None, :]).square()  # (x, x')
    border = torch.minimum((x + 1).square(), (w - x).square())
    out = torch.empty_like(g2)
    rows = max(1, _EDT_CHUNK_BYTES // (8 * w * w))
    for k in range(0, n * h, rows):
        out[k: k + rows] = (g2[k: k + rows, None, :] + dx2[None]).amin(-1)
    return torch.minimum(out, border).view(n, h, w) * regions


def region_peaks(regions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each map's point farthest from its region's boundary (border included), as in
    :func:`smartsam.masks.region_center`: ``(N, 2)`` int64 ``(x, y)`` and ``(N,)`` bool, False
    for an empty map. Ties go to the first pixel in row-major order."""
    n, h, w = regions.shape
    d2 = torch.where(regions, squared_distances(regions), -1).reshape(n, -1)
    k = torch.argmax(d2, dim=1)  # the first maximum
    return torch.stack([k % w, k // w], 1), regions.reshape(n, -1).any(1)


def place_clicks(logits: torch.Tensor, cut: torch.Tensor, band: float,
                 valid_hw: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Where each chain's click goes: ``(N, g, g)`` logits, ``(N,)`` bool (True: a Cut inside
    the mask, False: an Add outside it), the image's uncertain half-width and the grid's valid
    ``(rows, cols)`` -> low-res ``(N, 2)`` int64 ``(x, y)`` and ``(N,)`` bool (False: no
    uncertain pixel on that side, the chain ends).
    """
    lr = logits[:, : valid_hw[0], : valid_hw[1]].float()
    side = torch.where(cut.view(-1, 1, 1), lr > 0, lr <= 0)
    return region_peaks(largest_components(side & (lr.abs() < band)))
