"""Entry point of a warden worker process: ``python -m warden._worker``.

Kept tiny on purpose: the stdlib's spawn preparation replaces ``__main__``
(with the parent's main module, imported as ``__mp_main__``), so the worker's
code lives in an ordinary module.
"""

if __name__ == "__main__":
    from warden._workerloop import main

    main()
