"""Simulated terminal hardware, for tests, CI and the fleet simulator.

Each simulator implements one port of ``edge.terminal.drivers.contracts`` (or the
engine's ``Clock``) and lives in its own module; import the one you need (this package
imports nothing):

* ``hwsim.card_reader`` -- ``SimCardReader``: a queue of presented cards (``TEST_CARDS``
  by name), timeouts and injected read failures.
* ``hwsim.printer`` -- ``SimPrinter``: keeps what it printed; paper out, jams.
* ``hwsim.acquirer`` -- ``SimAcquirer``: a real HTTP server on loopback speaking the
  ``HttpAcquirer`` protocol; approve / decline / timeout / slow / error modes, BIN and
  amount rules, idempotent by key, and a ledger (masked PANs only) to assert
  exactly-once effects.
* ``hwsim.network`` -- ``SimNetworkLink``: down windows on a clock, manual switches,
  seeded loss.
* ``hwsim.clock`` -- ``VirtualClock``: a ``FakeClock`` that fires scheduled callbacks as
  time advances.
* ``hwsim.devices`` -- ``SimDeviceServer``: card reader, printer and link as HTTP
  endpoints (what the daemon talks to), with control endpoints for the simulated POS.
* ``hwsim.powerloss`` -- ``PowerLossVFS``: an apsw VFS that drops every write since each
  file's last sync at a simulated power cut (optionally tearing the last one), and a
  disk that fills (``free_bytes``).
* ``hwsim.cuttorture`` -- power cuts under payment load, and per-event sweeps of one
  payment, one refund and one saga rollback, each checked against invariant 2. Its
  parts: ``hwsim.cutrig`` (the terminal, its power and the POS app), ``hwsim.cutcheck``
  (the checker) and ``hwsim.cutsweep`` (the sweeps).
* ``hwsim.killtorture`` -- the daemon SIGKILLed at random moments under payment load;
  ``hwsim.killcheck`` checks invariant 2 after each kill. Its parts:
  ``hwsim.killfaults`` (the kill hooks, the lost answer, the weather),
  ``hwsim.killdaemon`` (the daemon process), ``hwsim.killpos`` (the POS app) and
  ``hwsim.killsync`` (a simulated cloud acknowledging through ``Terminal.acknowledge``
  inside the daemon's loop).
* ``hwsim.invariants`` -- the one checker of both tortures: the POS's book against the
  acquirer's ledger, money held, reversals, the outbox, the offline exposure (released
  exactly once per acknowledged or voided offline approval); ``hwsim.readings``, the
  data it reads (what the POS saw, the terminal as read).
* ``hwsim.faultproxy`` -- ``FaultProxy``: a seeded HTTP/1.1 proxy between a terminal and
  the cloud that drops, duplicates, delays, reorders and cuts requests mid-request and
  mid-response; ``down``/``up``/``heal`` for outages.
* ``hwsim.torture`` -- ``make torture``: both, and the sweeps, with one JSON tally.
* ``hwsim.demo`` -- ``make demo``: a simulated terminal through a network outage.
* ``hwsim.demorig`` -- the demo's rig: the daemon as a process, the hardware controls.
"""
