"""The Next Chain Clickers' placement for every chain of a step at once, as tensor work.

The rule of :meth:`smartsam.clickers.NextChainClicker.place` (the chosen side of the mask, the
uncertain band, the largest 8-connected region, its distance-transform peak) for a batch of logit
maps, on whichever device holds them: a GPU agent need not bring each chain's logits to the host
and place its clicks one chain at a time. Exact, not approximate: the same integers and the same
tie rules as the OpenCV path (``tests/test_chain_clicks.py`` holds them equal), so both paths give
the same clicks, hence the same candidates.

Two steps are iterative or sized by the data: the component labelling (rounds until nothing
changes) and the distance pass (how far along a row to look). Asking the device "done yet?" is a
read, a wait for it on a GPU. So :func:`place_clicks` runs a fixed number of rounds and a fixed
window, and returns with the clicks a flag, computed on the device, that says whether they were
enough (a fixed point reached, no distance found beyond the window's reach);
the caller reads the flag with the step's other results and, in the rare case it is False, places
again without the bounds. ``None`` for a bound runs that step to the end, reading as it goes.

All functions take ``(N, H, W)`` tensors (N maps, rows, columns) and keep their device.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

_EDT_CHUNK_BYTES = 64 << 20  # the unbounded distance pass works in pieces of about this size
# The bounds place_clicks runs with before its flag says whether they sufficed. Measured on 24
# steps of agent clicks (SAM 2.1 tiny, random weights, 4 GrabCut images, 30 maps each): the
# labelling reached its fixed point after 4 to 6 rounds (a 256 x 256 serpentine, one path through
# every other column, and 255 x 255 mazes take 7 to 8: 12 leaves a margin); no region pixel was
# more than 6 pixels from its boundary along its row or column (median 1). A round costs about a
# tenth of the labelling on a CPU; the window, 2 elementwise passes per pixel of width.
LABEL_ROUNDS = 12
DISTANCE_WINDOW = 16


def component_labels(regions: torch.Tensor, rounds: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Label 8-connected components: ``(N, H, W)`` bool -> ``(N, H, W)`` int64 where each
    component's pixels carry its smallest row-major flat index and the background ``H * W``,
    and a 0-dim bool tensor: True when that labelling is final.

    A forest of pointers, each pixel to a smaller pixel of its own component (the background to
    a sentinel), in rounds of: two pointer jumps; every pixel to the smallest pointer in its 3x3
    neighbourhood; every pixel's root to the smallest pointer next to any of its pixels (hooking,
    as in Shiloach-Vishkin, which merges whole trees a round, so the rounds grow with the log of a
    component's size rather than with its length). Nothing changing is the fixed point: every
    pixel points at its component's smallest pixel.

    Args:
        regions: ``(N, H, W)`` bool maps.
        rounds: None: until the fixed point (one read of the device a round). A number: that
            many rounds and a check, without a read; the flag says whether the fixed point was
            reached.
    """
    n, h, w = regions.shape
    none = h * w
    dev = regions.device
    sentinel = torch.full((n, 1), none, device=dev)
    idx = torch.arange(none, device=dev).expand(n, -1)
    # (N, H*W + 1) pointers; the last slot is the background's sentinel, pointing at itself
    ptr = torch.cat([torch.where(regions.reshape(n, -1), idx, none), sentinel], 1)
    done = 0
    while True:
        for _ in range(2):
            ptr = torch.gather(ptr, 1, ptr)
        # float32 for max_pool2d: flat indices stay exact below 2**24
        low = -F.max_pool2d(-ptr[:, :none].view(n, 1, h, w).float(), 3, stride=1, padding=1)
        low = torch.cat([torch.where(regions, low[:, 0].long(), none).reshape(n, -1), sentinel], 1)
        nxt = torch.minimum(ptr, low).scatter_reduce(1, ptr, low, "amin")
        if rounds is None:
            if torch.equal(nxt, ptr):  # a read of the device
                return ptr[:, :none].view(n, h, w), torch.ones((), dtype=torch.bool, device=dev)
        elif done == rounds:
            return ptr[:, :none].view(n, h, w), (nxt == ptr).all()
        ptr, done = nxt, done + 1


def largest_components(regions: torch.Tensor, rounds: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each map's largest 8-connected component, ``(N, H, W)`` bool (an empty map stays empty),
    and :func:`component_labels`' flag (``rounds`` as there).

    Equal areas go to the component OpenCV numbers first (``cv2.connectedComponentsWithStats``
    scans 2x2 blocks in row-major order): the one whose first block comes first.
    """
    n, h, w = regions.shape
    none = h * w
    lab, final = component_labels(regions, rounds)
    lab = lab.reshape(n, -1)
    area = torch.zeros(n, none + 1, dtype=torch.int64, device=regions.device)
    area.scatter_add_(1, lab, torch.ones_like(lab))
    area[:, none] = 0
    ys, xs = torch.meshgrid(torch.arange(h, device=regions.device), torch.arange(w, device=regions.device), indexing="ij")
    block = ((ys // 2) * ((w + 1) // 2) + xs // 2).reshape(1, -1).expand(n, -1)
    first = torch.full((n, none + 1), none, dtype=torch.int64, device=regions.device)
    first.scatter_reduce_(1, lab, block, reduce="amin")
    best = torch.argmax(area * (none + 1) - first, dim=1)  # largest area, then earliest block
    return (lab == best[:, None]).view(n, h, w) & regions, final


def _column_distances(regions: torch.Tensor) -> torch.Tensor:
    """Each pixel's distance along its column to the nearest pixel outside its region, the
    border counting as outside (0 outside), ``(N, H, W)`` int64."""
    h = regions.shape[1]
    y = torch.arange(h, device=regions.device).view(1, h, 1)
    above = torch.cummax(torch.where(regions, -1, y), dim=1).values  # -1: the border above
    below = torch.flip(torch.cummin(torch.flip(torch.where(regions, h, y), [1]), dim=1).values, [1])  # h: below
    return torch.minimum(y - above, below - y)


def squared_distances(regions: torch.Tensor, window: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Squared Euclidean distance of every pixel to the nearest pixel outside its region, the
    image border counting as outside: ``(N, H, W)`` bool -> ``(N, H, W)`` int64 (0 outside), and
    a 0-dim bool tensor, True when every distance is exact.

    Two passes: along each column (the nearest outside pixel above and below), then the minimum
    over columns of ``dx^2 + dy^2``, and the left and right borders.

    Args:
        regions: ``(N, H, W)`` bool maps.
        window: None: the second pass looks at every column (exact). A number: only at the
            columns within that many of the pixel's; exact (and the flag True) where every
            distance found is at most ``window + 1``, since a farther column adds at least
            that (no read of the device).
    """
    n, h, w = regions.shape
    dev = regions.device
    g2 = _column_distances(regions).square()
    x = torch.arange(w, device=dev)
    border = torch.minimum((x + 1).square(), (w - x).square())
    if window is None:
        flat = g2.reshape(n * h, w)
        dx2 = (x[:, None] - x[None, :]).square()  # (x, x')
        out = torch.empty_like(flat)
        rows = max(1, _EDT_CHUNK_BYTES // (8 * w * w))
        for k in range(0, n * h, rows):
            out[k: k + rows] = (flat[k: k + rows, None, :] + dx2[None]).amin(-1)
        out = out.view(n, h, w)
    else:
        out = g2.clone()
        for d in range(1, min(window, w - 1) + 1):
            torch.minimum(out[..., d:], g2[..., :-d] + d * d, out=out[..., d:])
            torch.minimum(out[..., :-d], g2[..., d:] + d * d, out=out[..., :-d])
    out = torch.minimum(out, border) * regions
    if window is None:
        return out, torch.ones((), dtype=torch.bool, device=dev)
    return out, (out <= (window + 1) ** 2).all()  # a column beyond the window adds at least (window + 1)^2


def region_peaks(regions: torch.Tensor, window: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each map's point farthest from its region's boundary (border included), as in
    :func:`smartsam.masks.region_center`: ``(N, 2)`` int64 ``(x, y)`` and ``(N,)`` bool, False
    for an empty map, and :func:`squared_distances`' flag (``window`` as there). Ties go to the
    first pixel in row-major order."""
    n, h, w = regions.shape
    d2, exact = squared_distances(regions, window)
    k = torch.argmax(torch.where(regions, d2, -1).reshape(n, -1), dim=1)  # the first maximum
    return torch.stack([k % w, k // w], 1), regions.reshape(n, -1).any(1), exact


def place_clicks(logits: torch.Tensor, cut: torch.Tensor, band: float, valid_hw: Tuple[int, int],
                 bounded: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each chain's click goes: ``(N, g, g)`` logits, ``(N,)`` bool (True: a Cut inside
    the mask, False: an Add outside it), the image's uncertain half-width and the grid's valid
    ``(rows, cols)`` -> low-res ``(N, 2)`` int64 ``(x, y)``, ``(N,)`` bool (False: no uncertain
    pixel on that side, the chain ends) and a 0-dim bool tensor, True when those are exact.

    ``bounded`` runs :data:`LABEL_ROUNDS` rounds of labelling and a :data:`DISTANCE_WINDOW`
    distance pass without reading the device; where the flag is False, place again with
    ``bounded=False`` (which reads as it goes, and is always exact).
    """
    lr = logits[:, : valid_hw[0], : valid_hw[1]].float()
    side = torch.where(cut.view(-1, 1, 1), lr > 0, lr <= 0)
    biggest, labelled = largest_components(side & (lr.abs() < band), LABEL_ROUNDS if bounded else None)
    xy, ok, measured = region_peaks(biggest, DISTANCE_WINDOW if bounded else None)
    return xy, ok, labelled & measured
