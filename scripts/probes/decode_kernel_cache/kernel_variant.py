"""The decode kernel (kernels_pallas/decode_layers_mgpu.py) with parts that can be left out,
to see what each costs, built from the kernel's own source when this module is imported (so
it is always the kernel as it stands; an edit that no longer applies fails here).

Module globals, set before tracing (the probe sets them per form):
  ATT = 0: no attention item and no merge (the barriers stay); SILU = 0: no SiLU step (its
  barrier stays); ROPE = 0: q/k stored unrotated; XR = 0: no row added into xr (the norms read
  stale sums); KV = 0: no new K/V rows added into the cache nor scaled; WGMMA = 0: no GEMM tile
  computed (the tiles still stream through the slots); FLUSH = 0: no unit's sums added into
  the outputs; NOWAIT: a set of barrier kinds ("DN", "Q", "ATT", "CMB", "O", "G", "H",
  "NRM") whose waits are skipped (the counts still go up, so the end's reset holds). All of
  those give wrong values, for timing only.
  FLAGS = 1 (right values): the activation streams of the gate/up and down projections and
  of the next layer's q/k/v, and the SiLU step, wait for the 128-column chunks they read
  (counters that each unit's flush counts up, kept over the layers and reset at the end),
  not for the grid barriers after o, gate/up, SiLU and down. The down projection still waits
  for the gate/up barrier before adding into x, which every block's gate/up tiles read.
"""
import os

EDITS = [  # (text in the kernel, its replacement), applied in order, each matching once
("GROUP = 4                  # query heads per KV head\n","GROUP = 4                  # query heads per KV head\nATT, SILU, ROPE, XR, KV, WGMMA, FLUSH, FLAGS, NOWAIT = 1, 1, 1, 1, 1, 1, 1, 0, frozenset()\n"),
('''        def wait_all(idx, count=B):
            plgpu.semaphore_wait(sems.at[idx], count, decrement=False, memory_scope="gpu")''','''        def wait_all(idx, count=B, kind=None):
            if kind in NOWAIT:
                return
            plgpu.semaphore_wait(sems.at[idx], count, decrement=False, memory_scope="gpu")'''),
("                        wait_all(dep)\n","                        wait_all(dep, kind=[\"DN\", \"CMB\", \"O\", \"H\"][p])\n"),
("                            wait_all([jnp.where(l == 0, 0, sem(l - 1, DN)), sem(l, O_)][which])","                            wait_all([jnp.where(l == 0, 0, sem(l - 1, DN)), sem(l, O_)][which],\n                                     kind=[\"DN\", \"O\"][which])"),
("\n                    wait_all(sem(l, ATT))\n","\n                    wait_all(sem(l, ATT), kind=\"ATT\")\n"),
("\n                wait_all(sem(l, ATT))\n","\n                wait_all(sem(l, ATT), kind=\"ATT\")\n"),
("                wait_all(nrm(l, 0), 1)\n","                wait_all(nrm(l, 0), 1, kind=\"NRM\")\n"),
("                    wait_all(sem(l, Q_))\n","                    wait_all(sem(l, Q_), kind=\"Q\")\n"),
("                    wait_all(sem(l, G_))\n","                    wait_all(sem(l, G_), kind=\"G\")\n"),
("                        wait_all(nrm(l, 1), 1)\n","                        wait_all(nrm(l, 1), 1, kind=\"NRM\")\n"),
("                                scale_new_rows(l)\n","                                if KV:\n                                    scale_new_rows(l)\n"),
("                    if p in (1, 3):   # row 0 into xr too","                    if p in (1, 3) and XR:   # row 0 into xr too"),
("                    if p == 0:   # the new token's K/V row (unscaled) into the cache","                    if p == 0 and KV:   # the new token's K/V row (unscaled) into the cache"),
("                    rotated = unit < 2 * (QH + KVH)   # q and k units","                    rotated = (unit < 2 * (QH + KVH)) & (ROPE == 1)   # q and k units"),
("                    @pl.when((b >= 1) & (b <= NI) & (item_s * TC <= pos))","                    @pl.when((b >= 1) & (b <= NI) & (item_s * TC <= pos) & (ATT == 1))"),
("                    @pl.when(b < QH)\n                    def _():\n                        merge(l)","                    @pl.when((b < QH) & (ATT == 1))\n                    def _():\n                        merge(l)"),
("                    @pl.when(b < F // SILU_W)","                    @pl.when((b < F // SILU_W) & (SILU == 1))"),
 ("""                    plgpu.wgmma(acc, w_smem.at[slot].transpose((1, 0)),
                                a_smem.at[slot].transpose((1, 0)))
                    plgpu.wgmma_wait(0)
""", """                    if WGMMA:
                        plgpu.wgmma(acc, w_smem.at[slot].transpose((1, 0)),
                                    a_smem.at[slot].transpose((1, 0)))
                        plgpu.wgmma_wait(0)
"""),
 ("""                    @pl.when((k == ks[p] - 1) | (i == n[p] - 1))
                    def _():
                        v = acc[...]""", """                    @pl.when(((k == ks[p] - 1) | (i == n[p] - 1)) & (FLUSH == 1))
                    def _():
                        v = acc[...]"""),
("""        sems = pl.get_global(plgpu.SemaphoreType.REGULAR((n_bar + 2,)))
""", """        # chunk counters (FLAGS): x after o, x after down, gate/up, h; one per 128 columns
        NX, NSB, NG = D // HD, F // SILU_W, F // COLS
        F0 = n_bar + 2
        NF = 2 * NX + 2 * NSB if FLAGS else 0
        sems = pl.get_global(plgpu.SemaphoreType.REGULAR((n_bar + 2 + NF,)))

        def contrib(p, u):   # blocks whose tiles add into unit u of GEMM p
            return lax.div((u + 1) * ks[p] - 1, per[p]) - lax.div(u * ks[p], per[p]) + 1

        def chunk_flag(p, u):   # the counter that unit u's flush counts up
            return [None, F0 + lax.div(u, 2), F0 + 2 * NX + lax.div(lax.rem(u, NG), 2),
                    F0 + NX + lax.div(u, 2)][p]

        def chunk_total(j):   # flushes into counter j per layer
            k = j - F0
            cx = lambda p, c: contrib(p, 2 * c) + contrib(p, 2 * c + 1)
            kg = jnp.clip(k - 2 * NX, 0, NSB - 1)
            cg = cx(2, kg) + cx(2, kg + NG // 2)
            return jnp.where(k < NX, cx(1, jnp.clip(k, 0, NX - 1)),
                             jnp.where(k < 2 * NX, cx(3, jnp.clip(k - NX, 0, NX - 1)),
                                       jnp.where(k < 2 * NX + NSB, cg, 1)))

        def wait_chunk(j, layers_done):
            plgpu.semaphore_wait(sems.at[j], layers_done * chunk_total(j), decrement=False,
                                 memory_scope="gpu")
"""),
("""                        wait_all(dep, kind=["DN", "CMB", "O", "H"][p])
                        src = [x_g, a_g.at[l], x_g, h_g.at[l]][p]

                        def a_tile(i, p=p, src=src):
                            k = lax.rem(start[p] + i, ks[p])
                            return src.at[:, pl.ds(k * HD, HD)]
""", """                        if FLAGS and p != 1:
                            if p == 0:
                                pl.when(l == 0)(lambda: wait_all(0))
                        else:
                            wait_all(dep, kind=["DN", "CMB", "O", "H"][p])
                        src = [x_g, a_g.at[l], x_g, h_g.at[l]][p]

                        def a_tile(i, p=p, src=src, l=l):
                            k = lax.rem(start[p] + i, ks[p])
                            if FLAGS and p != 1:
                                j, done = [(F0 + NX + k, l), None, (F0 + k, l + 1),
                                           (F0 + 2 * NX + NSB + k, l + 1)][p]
                                wait_chunk(j, done)
                            return src.at[:, pl.ds(k * HD, HD)]
"""),
("""                        plgpu.wait_smem_to_gmem(0)  # out_smem free again
                        flush(l, p, unit, v)
""", """                        plgpu.wait_smem_to_gmem(0)  # out_smem free again
                        if FLAGS and p == 3:
                            # x is read by every block's gate/up tiles: add into it only once
                            # all are past them (no block waits for all chunks otherwise)
                            wait_all(sem(l, G_))
                        flush(l, p, unit, v)
                        if FLAGS and p != 0:   # the unit's sums are in: count its chunk up
                            plgpu.wait_smem_to_gmem(0)
                            plgpu.semaphore_signal(sems.at[chunk_flag(p, unit)], 1,
                                                   memory_scope="gpu")
"""),
("""                    wait_all(sem(l, G_), kind="G")
""", """                    if FLAGS:
                        pl.when(b < NSB)(lambda: wait_chunk(F0 + 2 * NX + b, l + 1))
                    else:
                        wait_all(sem(l, G_), kind="G")
"""),
("""                        plgpu.copy_smem_to_gmem(h_smem, h_g.at[l, :, cols])
                        plgpu.wait_smem_to_gmem(0)
""", """                        plgpu.copy_smem_to_gmem(h_smem, h_g.at[l, :, cols])
                        plgpu.wait_smem_to_gmem(0)
                        if FLAGS:
                            plgpu.semaphore_signal(sems.at[F0 + 2 * NX + NSB + b], 1,
                                                   memory_scope="gpu")
"""),
("""                    @pl.when(idx < n_bar)
                    def _():
                        plgpu.semaphore_wait(sems.at[idx], final_count(idx), memory_scope="gpu")
""", """                    @pl.when(idx < n_bar)
                    def _():
                        plgpu.semaphore_wait(sems.at[idx], final_count(idx), memory_scope="gpu")

                if FLAGS:   # the chunk counters back to zero too
                    @pl.loop(0, -(-NF // B))
                    def _(t):
                        j = F0 + b + t * B

                        @pl.when(j < F0 + NF)
                        def _():
                            plgpu.semaphore_wait(sems.at[j], L * chunk_total(j),
                                                 memory_scope="gpu")
"""),
]


def _source() -> str:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                        "kernels_pallas", "decode_layers_mgpu.py")
    s = open(path).read()
    for old, new in EDITS:
        assert s.count(old) == 1, old
        s = s.replace(old, new)
    return s


_doc = __doc__
exec(compile(_source(), __file__ + " (the kernel, edited)", "exec"))
__doc__ = _doc   # the kernel's docstring came in with its source
