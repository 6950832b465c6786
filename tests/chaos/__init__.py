r"""Chaos: a real server under sustained mixed load while faults are injected; then the books are checked.

    python -m tests.chaos --duration 60 [--seed S] [--json PATH]

``run_chaos(ChaosConfig(...))`` (``tests/chaos/harness.py``) starts a server in this process (``tests.serving.running_server``,
with a restart intensity the injected faults cannot trip), drives it with many clients over real
localhost gRPC channels from a process of their own (``load_process``: so this process's RSS is
the server's), and injects, for ``duration_s`` seconds:

- every 100-400 ms, a fault in the next component of a shuffled rotation of every stage task
  (producer, processor-N, batcher-<model>, text-<model>, router: ``Supervisor.kill``) and of every
  text model's decode loop (a thread, not a task: its live ``DecodeBatch.step`` is wrapped to raise
  once, which fails every sequence of that loop; the engine starts a new loop on next use);
- exceptions inside image models' forward passes (``ImageGenerator._forward`` raises, inside
  ``run``, for one armed batch: the engine maps it to UNAVAILABLE "may be retried");
- batches that stall past their deadlines (``Engine.generate_images`` awaits ``asyncio.sleep``
  before running one armed batch, for longer than the latest deadline of the requests in it; an
  asyncio sleep, not ``time.sleep``: small batches run inline on the event loop);
- clients that disconnect mid-stream (a ``GenerateStream`` or a ``Generate`` call cancelled with
  requests in flight), requests cancelled by id on a stream, and requests whose deadline
  (``timeout_ms``, 1 ms up) expires while they are queued or decoding.

The load (all on raw ``grpc.aio`` stubs, so that the books hold what the server itself answered:
the SDK would retry UNAVAILABLE and enforce deadlines on the client, hiding both): closed-loop
``Generate`` clients for images (vae, gan) and text, ``GenerateStream`` sessions keeping a window
of mixed requests in flight within their credits, deadline probes and disconnectors.

The books. Every request has a globally unique id (sent as ``GenerateRequest.id``, so the server's
job has it too) and a ``timeout_ms``. Its terminal outcome is the ``Finish`` (OK, or the Finish's
code on a stream) or the call's status (``Generate``), or CLIENT_CANCELLED when the client itself
gave up on it; a second terminal message, a message after the Finish, or output for an id not in
flight is a duplicate. A request with no outcome ``safety_s`` after its deadline is given up on:
it is lost. Its deadline: ``timeout_ms`` counts from the server's admission (the server cannot
know when a request was sent), so a request is late when its outcome arrives more than
``late_tolerance_s`` after admission + timeout (``Pipeline.on_admit`` notes both, in the server's
process, on ``time.monotonic()``: one clock for both processes), or, if it was never admitted, after
send + timeout. The wait for admission is reported apart, with how many would be late counted from the send.

Which requests a fault touched (the classification rule). A fault's victims are taken at the
moment of the fault, from the component it hits:
- a killed stage: the unfinished jobs in its ``holding()`` just before ``kill`` (the supervisor
  fails exactly those with UNAVAILABLE);
- a failed forward pass or a stalled batch: the request ids of the chunks in that batch;
- a failed decode step: the decode loop holds every text request submitted to it, and its set
  changes on another thread, so every text request in flight at any moment between arming the
  fault and 100 ms after the loop was seen failed is counted as touched.
Deadline probes (deliberately short deadlines) and cancelled requests (by id, or on a stream the
client dropped) are neither touched nor untouched: they are expected to fail and are checked only
for one timely outcome. Every other request is "untouched"; at least ``min_untouched_success`` of
them must succeed (OK). Anything else that fails them (a fault reaching beyond what it held,
overload, a lost wake-up) counts against the server.

After the load: in-flight jobs drain to 0 and nothing is left behind (links empty, no stage holds a
job, decode loops idle), every closed stream got all its credit back, health ("" and
genserve.v1.Generator) is SERVING, the kills counted here equal the supervisor's restarts and the
sum of ``genserve_stage_restarts_total``, every stage kind and decode loop was faulted, fresh
requests of every model succeed, and the server's RSS (this process: the load is in another) peaks
within ``memory_peak_mb`` (150) of where it was after warm-up and ends, drained, within
``memory_end_mb`` (50) of it BEFORE any ``gc.collect()``: big buffers (KV caches, latents, results)
must go with their work by reference counting, not wait for the cyclic collector. The RSS after a
collection is reported too. The summary is printed; the exit status is 1 when a check failed.

The package: ``config`` (ChaosConfig and the outcome names), ``ledger`` (the books), ``faults``
(the injector, through the engine's one fault seam ``engine/faults.py``), ``load`` (the clients),
``load_process`` (the clients' process, and the books' way back),
``report`` (classification, checks, the summary), ``harness`` (the run), ``__main__`` (the command).
"""
