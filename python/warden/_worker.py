"""Entry point of a warden worker process: ``python -m warden._worker``.

Kept tiny on purpose: the stdlib's spawn preparation replaces ``__main__``
(with the parent's main module, imported as ``__mp_main__``), so the worker's
code lives in an ordinary module. Started with ``WARDEN_ZYGOTE`` set, the
process is a pool's zygote instead (``warden._zygote``), and becomes a worker
in each child it forks.
"""

if __name__ == "__main__":
    import os

    # The PYTHONPATH the program has, where the pool put warden's directory
    # in front of it to start this interpreter (warden._runner.worker_env).
    _was = os.environ.pop("WARDEN_PYTHONPATH", None)
    if _was == "-":
        os.environ.pop("PYTHONPATH", None)
    elif _was is not None:
        os.environ["PYTHONPATH"] = _was[1:]

    if "WARDEN_ZYGOTE" in os.environ:
        from warden._zygote import main
    else:
        from warden._workerloop import main

    main()
