"""The KV engines: many token rows decoded together, each keeping its KV cache across turns.

Read later: rollout.py's dialogue loop only needs `KVBatch`'s five methods (add, extend, generate,
rollback, drop); this file is how they are made fast.

`KVBatch` -- incremental batched decoding. Each dialogue is a *row* that keeps its full token list and
its KV cache across turns; each turn only the row's new tokens (the *delta*: the last sampled token,
the other side's message, the next header) are prefilled. Deltas of different lengths are
right-padded and appended after the cached past, so the cache has *holes* (padding slots); a 2-D
attention mask over past + new hides them, and explicit position ids give every real token the
position it would have in an unpadded sequence. That is why greedy decoding here equals
`model.generate` on the unpadded ids token for token (tested). Holes are squeezed out at the start of
each call (`_compact`), and finished dialogues leave the batch (`drop`).

`StaticKVBatch` -- the same rows in fixed-capacity buffers with bucketed row counts, so the one-token
decode step has static shapes and is compiled once (`rollout.compile`: CUDA graphs on CUDA).

`decoder_for` picks the engine from the config; `wave_rows` sizes how many dialogues decode together.
"""

import contextlib
import functools
import itertools
import os
import time

import torch

import lm

def sample_next(logits, temperature, top_p, generator):
    """Pick one token per row. logits (B, V) -> (tokens (B,), logprobs (B,)).
    The recorded log-prob is log softmax(logits / T) of the token with T = `lm.logprob_temperature`
    (T = 1 when greedy), the quantity the trainer recomputes. `generator` must live on the logits'
    device (`device_generator`); sampling stays on the device, nothing is synchronised here."""
    logits = logits.float()
    if temperature <= 0:
        tokens = logits.argmax(-1)
        logprobs = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
        return tokens, logprobs
    logprobs_all = torch.log_softmax(logits / lm.logprob_temperature(temperature), -1)   # (B, V)
    probs = logprobs_all.exp()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p                # keep the nucleus
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    if generator is not None and generator.device != probs.device:
        raise ValueError(f"the sampling generator lives on {generator.device} but the logits on {probs.device}; "
                         f"create it with rollout.device_generator(seed, device).")
    # inverse-CDF sampling: one uniform per row, the first token whose cumulative mass exceeds it. The
    # same distribution as torch.multinomial, which draws an exponential for every vocabulary entry
    # (27% of a CPU decode step at 96 rows x 49k tokens); zero-probability tokens are never picked.
    cdf = probs.cumsum(-1)                                                      # (B, V)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)
    return tokens, logprobs_all.gather(-1, tokens[:, None]).squeeze(-1)


def device_generator(seed, device):
    """A seeded torch.Generator on `device` (a model, a tensor's device or a name): sampling draws from
    a generator on the same device as the logits, so one code path serves CPU and CUDA."""
    if isinstance(device, torch.nn.Module):
        device = next(device.parameters()).device
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def _slot_cache(n_layers):
    """A transformers Cache whose layers keep keys/values in preallocated buffers (`_SlotLayer`)."""
    from transformers.cache_utils import Cache, DynamicLayer

    class _SlotLayer(DynamicLayer):
        """A DynamicLayer whose keys/values are views of a buffer with spare room along the slot axis
        that grows by half when full: appending a token writes into the buffer instead of copying the
        whole cache into a new tensor (torch.cat) every decode step. Measured on the 2-core CPU, 96
        rows x 400 slots: the cat was 53% of a decode step. `keys`/`values` always hold exactly the
        used slots, so the attention, the mask and every KVBatch operation see what they saw before."""

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.dtype, self.device = key_states.dtype, key_states.device
                self.buffers = [key_states.new_zeros(key_states.shape[:2] + (0,) + key_states.shape[3:])] * 2
                self.used = 0
                self.is_initialized = True
            new = key_states.shape[-2]
            if self.used + new > self.buffers[0].shape[-2]:
                room = max(64, (self.used + new) // 2)
                self.buffers = [torch.cat([b[:, :, :self.used], b.new_zeros(b.shape[:2] + (new + room,) + b.shape[3:])], 2)
                                for b in self.buffers]
            for b, x in zip(self.buffers, (key_states, value_states)):
                b[:, :, self.used:self.used + new] = x
            self.used += new
            self.keys, self.values = (b[:, :, :self.used] for b in self.buffers)
            return self.keys, self.values

        def set_used(self, keys, values):
            """Replace the used slots (a row or slot reordering by KVBatch) and keep the spare room."""
            self.buffers = [x.contiguous() for x in (keys, values)]
            self.used = keys.shape[-2]
            self.keys, self.values = self.buffers

    cache = Cache(layers=[_SlotLayer() for _ in range(n_layers)])
    return cache


class KVBatch:
    """Rows of token ids, each with a KV cache, decoded together.

    Usage (all dialogues of a rollout):
        batch = KVBatch(model, pad_id, adapter=True)
        batch.add("d0", system_ids); batch.add("d1", other_ids)
        batch.extend("d0", user_turn_ids + header_ids)       # any number of new tokens per row
        out = batch.generate(max_new_tokens=48, stop_ids={eos})   # {key: (tokens, logprobs)}
        batch.ids("d0")                                      # the full sequence, as fed/sampled
        batch.drop(["d1"])                                   # finished dialogue leaves the batch

    `adapter=False` runs the same model with its LoRA adapter disabled (the simulator role).
    `fold=True` decodes the adapter folded into the weights (`lm.folded`, fast path; the plain path is
    fold=False): the folded weights are computed at the first `generate` and again whenever the
    adapter's parameters have changed since.
    """

    def __init__(self, model, pad_id, adapter=True, share_prefix=True, fold=False):
        self.model, self.pad_id, self.adapter = model, pad_id, adapter
        self.share_prefix = share_prefix
        self.fold = fold and adapter
        self._folded, self._folded_stamp = None, None   # lm.fold_adapter's pairs, and the adapter version they fold
        self.keys = []          # row order in the cache
        self.rows = {}          # key -> list of token ids (all of them, cached or not)
        self.n_cached = {}      # key -> how many of those are in the cache
        self.cache = None       # a Cache of _SlotLayer: (B, heads, L, head_dim) used slots per layer
        self.mask = None        # (B, L) 1 where a cache slot holds a real token
        self.prefill_tokens = 0     # real tokens prefilled              } counters for bench.py
        self.generated_tokens = 0   # tokens sampled                    }
        self.decode_steps = 0       # batched one-token forwards         }
        self.kv_slots_read = 0      # cache slots (rows x length) the decode steps attended over
        self.prefill_s = self.decode_s = 0.0   # wall time of the prefills and of the decode loops
        self.sync = False           # bench.py: synchronise CUDA before reading the clock

    # -- bookkeeping ---------------------------------------------------------------------------
    def add(self, key, ids):
        assert key not in self.rows, f"row {key!r} exists"
        self.keys.append(key)
        self.rows[key] = list(ids)
        self.n_cached[key] = 0
        if self.cache is not None:  # a new row joins an existing batch: an all-hole cache row
            self._resize_rows(lambda t: torch.cat([t, t.new_zeros((1,) + t.shape[1:])]))
            self.mask = torch.cat([self.mask, self.mask.new_zeros(1, self.mask.shape[1])])

    def extend(self, key, ids):
        self.rows[key].extend(ids)

    def ids(self, key):
        return self.rows[key]

    def drop(self, keys):
        keys = set(keys)
        keep = [i for i, k in enumerate(self.keys) if k not in keys]
        for k in keys:
            del self.rows[k], self.n_cached[k]
        self.keys = [self.keys[i] for i in keep]
        if self.cache is not None:
            index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
            self._resize_rows(lambda t: t.index_select(0, index))
            self.mask = self.mask.index_select(0, index)
            if not self.keys:
                self.cache = self.mask = None

    def rollback(self, key, n_tokens):
        """Forget the last `n_tokens` of a row (e.g. an unusable simulator line): its cache slots
        become holes, so the next turn continues as if they had never been generated."""
        row = self._row(key)
        keep = len(self.rows[key]) - n_tokens
        # forget cached slots past `keep`, and the last kept one too if nothing uncached would remain:
        # generating needs the logits of the row's last token, so it must be prefilled again
        cached_tail = self.n_cached[key] - min(self.n_cached[key], keep - 1)
        if cached_tail > 0:
            real = self.mask[row].nonzero().squeeze(-1)
            self.mask[row, real[-cached_tail:]] = 0
            self.n_cached[key] -= cached_tail
        del self.rows[key][len(self.rows[key]) - n_tokens:]

    def _layers(self):
        return self.cache.layers

    def _resize_rows(self, fn):
        for layer in self._layers():
            if layer.is_initialized:
                layer.set_used(fn(layer.keys), fn(layer.values))

    def _compact(self):
        """Squeeze the holes out: each row's real slots move, in order, to the right end."""
        counts = self.mask.sum(1)                                            # (B,)
        length = int(counts.max())
        if length == self.mask.shape[1]:
            return
        order = torch.sort(self.mask, dim=1, stable=True).indices[:, -length:]  # real slots last
        index = order[:, None, :, None]                                      # (B, 1, L', 1)
        self._resize_rows(lambda t: t.gather(2, index.expand(-1, t.shape[1], -1, t.shape[3])))
        self.mask = self.mask.gather(1, order)

    def _clock(self):
        if self.sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    # -- the forward pass ----------------------------------------------------------------------
    def _forward(self, input_ids, new_mask, keep=None):
        """Append (B, n) tokens; new_mask (B, n) marks the real ones. Returns logits (B, n, V), or
        (B, len(keep), V) for the positions `keep` only (a prefill needs one position per row, and
        (B, n, V) logits would dwarf the KV cache)."""
        device = input_ids.device
        if self.cache is None:
            self.cache = _slot_cache(self.model.config.get_text_config().num_hidden_layers)
            self.mask = torch.zeros(len(self.keys), 0, dtype=torch.long, device=device)
        past_real = self.mask.sum(1, keepdim=True)                             # (B, 1)
        positions = past_real + new_mask.cumsum(1) - 1                         # real tokens: 0,1,2..
        positions = positions.clamp(min=0)
        attention = torch.cat([self.mask, new_mask], 1)                        # (B, L + n)
        out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=0 if keep is None else keep)
        self.mask = attention
        return out.logits

    @torch.no_grad()
    def generate(self, max_new_tokens, stop_ids, temperature=0.0, top_p=1.0, generator=None):
        """Prefill every row's uncached tokens, then decode up to `max_new_tokens` per row, stopping a
        row at the first token in `stop_ids` (kept: it is part of the sequence). Returns
        {key: (new token ids, their log-probs)}. The last sampled token of each row stays uncached
        and is prefilled with the row's next delta. `adapter=False` bypasses the LoRA adapter for the
        whole call (toggling it costs a walk over every module: once per call, not per token)."""
        with lm.adapter_off(self.model) if not self.adapter else self._folded_adapter():
            return self._generate(max_new_tokens, stop_ids, temperature, top_p, generator)

    def _folded_adapter(self):
        """`lm.folded` with this batch's folded weights (recomputed if the adapter changed), or nothing."""
        if not self.fold:
            return contextlib.nullcontext()
        # an optimizer step bumps a parameter's version, a load that replaces its tensor moves its storage
        stamp = tuple((p.data_ptr(), p._version) for n, p in self.model.named_parameters() if "lora_" in n)
        if stamp != self._folded_stamp:
            self._folded, self._folded_stamp = lm.fold_adapter(self.model), stamp
        return lm.folded(self.model, self._folded) if self._folded else contextlib.nullcontext()

    def _prefill_shared(self, device, min_shared=32):
        """Before the first prefill: rows that start with the same tokens -- the G dialogues of a persona
        share its system prompt, ~420 tokens -- get that prefix computed once and its cache slots
        copied, instead of once per row. One leader row per group is prefilled up to the group's common
        prefix (right-padded, like any delta); its cache rows are then gathered into every member's row,
        and each row goes on from there with its own tokens. A row joins the group whose leader it shares
        the longest prefix with, if that is `min_shared` tokens or more and joining saves more than it
        costs: the row skips n tokens, while the group's shared prefix shrinks to n for every member. (So
        the G dialogues of a persona, whose opening lines differ, share its ~430-token system prompt, but
        a persona of the same bank, which shares only the prompt's first ~40 tokens, starts its own group
        instead of cutting that group's prefix to 40.) Every row keeps at least one token uncached (its
        logits start the generation). Exact up to the floating-point order of a smaller batch (tested:
        the same greedy dialogues as without)."""
        leaders, group_of, shared, size = [], [], [], []
        for k in self.keys:
            row = self.rows[k]
            best, n = None, 0
            for g, lead in enumerate(leaders):
                common = len(os.path.commonprefix([row[:len(row) - 1], self.rows[lead]]))
                if common > n:
                    best, n = g, common
            if best is not None and n >= min_shared and n > size[best] * (shared[best] - n):
                group_of.append(best)
                shared[best] = min(shared[best], n)
                size[best] += 1
            else:
                group_of.append(len(leaders))
                leaders.append(k)
                shared.append(len(row) - 1)
                size.append(1)
        if len(leaders) == len(self.keys):
            return                                  # nothing shared: the plain prefill does it all
        width = max(shared)
        input_ids = torch.full((len(leaders), width), self.pad_id, dtype=torch.long, device=device)
        new_mask = torch.zeros_like(input_ids)
        for g, (lead, n) in enumerate(zip(leaders, shared)):
            input_ids[g, :n] = torch.tensor(self.rows[lead][:n], device=device)
            new_mask[g, :n] = 1
        t0 = self._clock()
        self.cache = _slot_cache(self.model.config.get_text_config().num_hidden_layers)
        self.model(input_ids=input_ids, attention_mask=new_mask, position_ids=(new_mask.cumsum(1) - 1).clamp(min=0),
                   past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        index = torch.tensor(group_of, dtype=torch.long, device=device)
        self._resize_rows(lambda t: t.index_select(0, index))                # a copy per member row
        self.mask = new_mask.index_select(0, index)
        for k, g in zip(self.keys, group_of):
            self.n_cached[k] = shared[g]
        self.prefill_tokens += sum(shared)
        self.prefill_s += self._clock() - t0

    def _rows(self):
        """The cache's rows in order, each a key (None would be a row no dialogue owns: StaticKVBatch)."""
        return self.keys

    def _row(self, key):
        return self.keys.index(key)

    def _prefill(self, device):
        """Feed every row's uncached tokens (right-padded, one forward) and return the logits that start
        each row's generation (R, V)."""
        if self.cache is None and self.share_prefix:
            self._prefill_shared(device)
        if self.cache is not None:
            self._compact()
        rows = self._rows()
        deltas = [self.rows[k][self.n_cached[k]:] if k is not None else [self.pad_id] for k in rows]
        assert all(deltas), "every row needs at least one new token before generating"
        width = max(map(len, deltas))
        input_ids = torch.full((len(deltas), width), self.pad_id, dtype=torch.long, device=device)
        new_mask = torch.zeros_like(input_ids)
        for i, (k, d) in enumerate(zip(rows, deltas)):
            input_ids[i, :len(d)] = torch.tensor(d, device=device)
            new_mask[i, :len(d)] = int(k is not None)
        t0 = self._clock()
        last = torch.tensor([len(d) - 1 for d in deltas], device=device)
        keep, where = torch.unique(last, return_inverse=True)                  # distinct last positions
        logits = self._forward(input_ids, new_mask, keep=keep)                 # (R, len(keep), V)
        next_logits = logits[torch.arange(len(deltas), device=device), where]  # (R, V)
        self.prefill_s += self._clock() - t0
        for k, d in zip(rows, deltas):
            if k is not None:
                self.n_cached[k] += len(d)
                self.prefill_tokens += len(d)
        return next_logits

    def _step(self, step_ids, active):
        """One decode step: feed (R, 1) tokens, `active` (R,) marks the rows still going (the others get
        a hole). Returns the next logits (R, V)."""
        self.kv_slots_read += len(active) * (self.mask.shape[1] + 1)
        return self._forward(step_ids, active.long()[:, None])[:, -1]

    def _generate(self, max_new_tokens, stop_ids, temperature, top_p, generator):
        device = next(self.model.parameters()).device
        self._reserve = max_new_tokens             # slots the decode may still append (StaticKVBatch's capacity)
        next_logits = self._prefill(device)
        t1 = self._clock()

        # decode: tokens and log-probs stay on the device in (R, max_new_tokens) buffers; the only host
        # synchronisation per step is "is any row still going?", and the buffers move to the host once
        stop = torch.tensor(sorted(stop_ids), device=device)
        rows = self._rows()
        n_rows = len(rows)
        token_buf = torch.full((n_rows, max_new_tokens), -1, dtype=torch.long, device=device)
        logprob_buf = torch.zeros((n_rows, max_new_tokens), dtype=torch.float32, device=device)
        active = torch.tensor([k is not None for k in rows], dtype=torch.bool, device=device)
        fed = torch.zeros(n_rows, dtype=torch.long, device=device)             # tokens fed into the cache
        for step in range(max_new_tokens):
            tokens, logprobs = sample_next(next_logits, temperature, top_p, generator)
            token_buf[:, step] = torch.where(active, tokens, -1)              # finished rows record nothing
            logprob_buf[:, step] = logprobs
            active = active & ~torch.isin(tokens, stop)
            if step == max_new_tokens - 1 or not bool(active.any()):
                break
            # feed the tokens of rows still going; finished rows get a padding hole
            step_ids = torch.where(active, tokens, torch.full_like(tokens, self.pad_id))[:, None]
            next_logits = self._step(step_ids, active)
            fed += active.long()
            self.decode_steps += 1
        token_rows, logprob_rows, fed = token_buf.tolist(), logprob_buf.tolist(), fed.tolist()
        self.decode_s += self._clock() - t1
        out = {}
        for i, k in enumerate(rows):
            if k is None:
                continue
            n = sum(t >= 0 for t in token_rows[i])
            # every sampled token but the last was fed; the last is prefilled with the row's next delta
            self.n_cached[k] += fed[i]
            self.rows[k].extend(token_rows[i][:n])
            self.generated_tokens += n
            out[k] = (token_rows[i][:n], logprob_rows[i][:n])
        return out


def row_bucket(n):
    """The physical rows a static batch of `n` dialogues gets: the first of 1, 2, 3, 4, 6, 8, 12, 16, 24,
    ... (powers of two and 1.5x powers of two) that holds them, so a batch that shrinks as calls end
    changes shape -- and recompiles -- only O(log n) times, wasting at most a third of a step on rows no
    dialogue owns."""
    return next(b for k in itertools.count() for b in (2 ** k, 3 * 2 ** k // 2) if b >= n)


def _step_eager(model, cache, ids, mask, positions):
    """One decode step over static shapes: ids (R, 1), mask (R, capacity), positions (R, 1) -> (R, V)."""
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                 use_cache=True, logits_to_keep=1).logits[:, -1]


def _compiled_step(device):
    """`_step_eager` compiled once per shape (and per adapter view): CUDA graphs on CUDA
    (`reduce-overhead`: one graph replay instead of hundreds of kernel launches), inductor's fused
    kernels on the CPU. One per device, so every batch shares its graphs."""
    key = str(device)
    if key not in _STEPS:
        # one graph per (row bucket, capacity, view): up to ~2 x 12 for a wave of 64 calls ending one by
        # one, past dynamo's default of 8 graphs per function (after which it would run eagerly)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        mode = "reduce-overhead" if torch.device(device).type == "cuda" else None
        _STEPS[key] = torch.compile(_step_eager, mode=mode, dynamic=False)
    return _STEPS[key]


_STEPS = {}


class StaticKVBatch(KVBatch):
    """KVBatch with a fixed-capacity cache and a compiled decode step (`rollout.compile: on`).

    Why: an eager decode step of a small model on a GPU costs its kernel launches (~24 ms measured on an
    H100 at any batch size), not its arithmetic. Capturing the step once as a CUDA graph needs every
    tensor it touches to keep its shape and address from step to step -- and KVBatch's cache grows by a
    slot each step. So here:

    * every layer's keys/values live in one buffer of `capacity` slots (transformers' `StaticLayer`):
      a step writes its slot in place (`index_copy_` at the cache's length, a device tensor), and the
      attention reads all `capacity` slots, the unused ones hidden by the (R, capacity) mask. Holes,
      positions and compaction mean exactly what they mean in KVBatch.
    * rows are bucketed (`row_bucket`): a dialogue that ends leaves its row to nobody (its key becomes
      None, its tokens a hole) until the live rows fit a smaller bucket, when the rows are gathered
      into a smaller buffer (a new shape: one more compile, O(log rows) in all).
    * the first prefill of a wave runs on KVBatch's growing cache (shared prefixes and all) and is then
      copied into the fixed buffers; later prefills (each turn's deltas, varying widths) run eagerly on
      the fixed buffers. Only the one-token step is compiled (`_compiled_step`).

    `capacity` fixes the slots per row for the whole wave (on CUDA: `max_context` + a turn, one shape);
    None grows them in blocks of 256 as needed (the CPU, where memory is scarcer than compiles), each
    block a new shape. `compile=False` runs the same static layout eagerly (the tests compare the two).
    """

    BLOCK = 256

    def __init__(self, model, pad_id, adapter=True, share_prefix=True, capacity=None, compile=True):
        super().__init__(model, pad_id, adapter, share_prefix)   # never folded: a captured graph keeps weight addresses
        self.capacity, self.compile = capacity, compile
        self.static = False         # True once the cache is the fixed-capacity one
        self.phys = []              # the physical rows: a key, or None for a row no dialogue owns
        self.used = 0               # slots written so far (the same for every row)
        self._reserve = 0           # slots the running generate may still append (set by KVBatch._generate)

    # -- rows ------------------------------------------------------------------------------------
    def _rows(self):
        return self.phys if self.static else self.keys

    def _row(self, key):
        return self._rows().index(key)

    def add(self, key, ids):
        if not self.static:
            return super().add(key, ids)
        self.keys.append(key)
        self.rows[key], self.n_cached[key] = list(ids), 0
        if None not in self.phys:             # no free row: grow to the next bucket
            self._regroup(self.phys + [None] * (row_bucket(len(self.phys) + 1) - len(self.phys)))
        row = self.phys.index(None)
        self.phys[row] = key
        self.mask[row] = 0

    def drop(self, keys):
        if not self.static:
            return super().drop(keys)
        keys = set(keys)
        for k in keys:
            del self.rows[k], self.n_cached[k]
            row = self.phys.index(k)
            self.phys[row] = None
            self.mask[row] = 0
            self.mask[row, 0] = 1     # one visible slot: a row attending to nothing would give NaNs
        self.keys = [k for k in self.keys if k not in keys]
        if not self.keys:
            self.cache = self.mask = None
            self.static, self.phys, self.used = False, [], 0
        elif row_bucket(len(self.keys)) < len(self.phys):
            live = [k for k in self.phys if k is not None]
            self._regroup(live + [None] * (row_bucket(len(live)) - len(live)))

    def _regroup(self, new_phys, capacity=None):
        """Rebuild the buffers with rows `new_phys` (keys or None) in that order and `capacity` slots
        (default: as now): a new shape. Rows no dialogue owns copy row 0 and see one slot of it. Returns
        the source row of each new row."""
        old = {k: i for i, k in enumerate(self.phys) if k is not None}
        src = [old.get(k, 0) for k in new_phys]
        fresh = [k is None or k not in old for k in new_phys]
        index = torch.tensor(src, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        for i, f in enumerate(fresh):
            if f:
                self.mask[i] = 0
                self.mask[i, 0] = 1
        self._allocate(len(new_phys), capacity or self.mask.shape[1], lambda t: t.index_select(0, index))
        self.phys = list(new_phys)
        return index

    # -- slots -----------------------------------------------------------------------------------
    def _allocate(self, n_rows, capacity, rows_of=lambda t: t):
        """New fixed buffers of (n_rows, heads, capacity, head_dim) per layer holding `rows_of` of the
        used slots of the current ones."""
        from transformers.cache_utils import Cache, StaticLayer
        old = self.cache.layers
        cache = Cache(layers=[StaticLayer(max_cache_len=capacity) for _ in old])
        for layer, o in zip(cache.layers, old):
            k, v = rows_of(o.keys[:, :, :self.used]), rows_of(o.values[:, :, :self.used])
            shape = (n_rows, k.shape[1], capacity, k.shape[3])
            layer.lazy_initialization(k.new_zeros(shape), v.new_zeros(shape[:3] + (v.shape[3],)))
            layer.keys[:, :, :self.used] = k
            layer.values[:, :, :self.used] = v
            layer.cumulative_length.fill_(self.used)
        self.cache = cache
        if self.mask.shape[1] != capacity:
            grown = self.mask.new_zeros(n_rows, capacity)
            grown[:, :min(capacity, self.mask.shape[1])] = self.mask[:, :capacity]
            self.mask = grown

    def _make_static(self):
        """KVBatch's growing cache (used slots only) -> fixed buffers for bucketed rows. Returns the
        source row of each physical row (the spare ones copy row 0 and are masked)."""
        self.used = self.mask.shape[1]
        self.phys = list(self.keys)
        index = self._regroup(self.phys + [None] * (row_bucket(len(self.phys)) - len(self.phys)),
                              self._capacity_for(self.used))
        self.static = True
        return index

    def _capacity_for(self, slots):
        need = slots + self._reserve
        if self.capacity and need <= self.capacity:
            return self.capacity
        return -(-need // self.BLOCK) * self.BLOCK

    def _compact(self):
        if not self.static:
            return super()._compact()
        mask = self.mask[:, :self.used]
        counts = mask.sum(1)
        length = int(counts.max())
        if length == self.used:
            return
        order = torch.sort(mask, dim=1, stable=True).indices[:, -length:]    # real slots last
        index = order[:, None, :, None]
        for layer in self.cache.layers:
            for buf in (layer.keys, layer.values):
                buf[:, :, :length] = buf[:, :, :self.used].gather(2, index.expand(-1, buf.shape[1], -1, buf.shape[3]))
            layer.cumulative_length.fill_(length)
        self.mask[:, :length] = mask.gather(1, order)
        self.mask[:, length:] = 0
        self.used = length

    # -- forward passes --------------------------------------------------------------------------
    def _prefill(self, device):
        if self.static:
            return super()._prefill(device)
        logits = super()._prefill(device)        # a wave's first: on KVBatch's growing cache, prefixes shared
        return logits.index_select(0, self._make_static())      # + the rows no dialogue owns yet

    def _forward(self, input_ids, new_mask, keep=None):
        if not self.static:
            return super()._forward(input_ids, new_mask, keep)
        n = input_ids.shape[1]
        if self.used + n + self._reserve > self.mask.shape[1]:
            self._allocate(len(self.phys), self._capacity_for(self.used + n))
        past_real = self.mask[:, :self.used].sum(1, keepdim=True)
        positions = (past_real + new_mask.cumsum(1) - 1).clamp(min=0)
        self.mask[:, self.used:self.used + n] = new_mask
        out = self.model(input_ids=input_ids, attention_mask=self.mask, position_ids=positions,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=0 if keep is None else keep)
        self.used += n
        return out.logits

    def _step(self, step_ids, active):
        self.kv_slots_read += self.mask.numel()
        self.mask[:, self.used] = active.long()
        positions = (self.mask.sum(1, keepdim=True) - 1).clamp(min=0)
        step = _compiled_step(step_ids.device) if self.compile else _step_eager
        logits = step(self.model, self.cache, step_ids, self.mask, positions)
        self.used += 1
        return logits.clone()      # a CUDA graph's output is overwritten by its next replay


def free_memory(device):
    """Bytes the rollout may fill on `device`: the GPU's memory less what this process holds (its
    weights), or the host's total memory. Deliberately not what happens to be free right now: the wave
    size decides which dialogues share a sampling stream, so it must not change with what other jobs
    use, or the same seed would sample other dialogues from run to run."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_bytes_per_row(model, max_context):
    """KV-cache bytes one dialogue can reach: keys and values of every layer at `max_context` slots, in
    the model's own dtype (4 bytes a value in float32, 2 in bfloat16)."""
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
    if not dtype.is_floating_point:          # quantised weights: the cache holds the compute dtype
        dtype = getattr(text, "torch_dtype", None) or torch.bfloat16
    return 2 * text.num_hidden_layers * kv_heads * head_dim * max_context * torch.finfo(dtype).bits // 8


def wave_rows(model, rollout_cfg):
    """How many dialogues advance together: `rollout.wave_rows`, or 0 = as many as half the memory holds
    (`free_memory`, on the CPU too) at `max_context` tokens in two KV caches each (the policy's and the
    simulator's view) -- a bound, since most calls end well short of `max_context`. Sampled dialogues
    depend on it (greedy ones do not: tested); set it to compare runs across machines."""
    if rollout_cfg["wave_rows"] > 0:
        return rollout_cfg["wave_rows"]
    device = next(model.parameters()).device
    per_row = 2 * kv_bytes_per_row(model, rollout_cfg["max_context"])
    return max(1, int(0.5 * free_memory(device) / per_row))


def decoder_for(model, rollout_cfg):
    """The decoding engine `rollout.compile` asks for: KVBatch (off), or StaticKVBatch with its compiled
    step (on; auto = on where it measures faster, CUDA). On CUDA the static cache holds a whole call
    (`max_context` plus a turn) from the start, so each wave compiles once per row bucket."""
    device = next(model.parameters()).device
    choice = rollout_cfg.get("compile", "off")
    if choice == "off" or (choice == "auto" and device.type != "cuda"):
        return functools.partial(KVBatch, fold=rollout_cfg.get("fold_adapter", False))
    capacity = rollout_cfg["max_context"] + rollout_cfg["max_new_tokens"] if device.type == "cuda" else None
    return functools.partial(StaticKVBatch, capacity=capacity)
