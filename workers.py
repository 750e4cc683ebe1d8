"""
Worker processes for long work on every core (prepare.py counts and encodes text on them): a pool
whose workers leave Ctrl-C to the parent and end when it dies, and an ordered map over it whose
memory stays bounded however many tasks there are; and an iterator run in a child process, so that
a crash in a library (a segfault) is an exception here.

    pool = worker_pool(cpu_count())
    try:
        for result in ordered_map(pool, encode, tasks, ahead=8):   # encode(*task), in order
            ...
    finally:
        end_pool(pool)
"""

import collections
import contextlib
import os
import pickle
import signal
import time


def cpu_count():
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def worker_pool(processes):
    """A multiprocessing pool whose workers leave Ctrl-C to the parent and end when the parent dies
    (kill -9 included), instead of waiting forever for work. Forked where the system can (fast to
    start), else spawned."""
    import multiprocessing
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    return context.Pool(processes, initializer=_worker_start, initargs=(os.getpid(),))


def end_pool(pool, wait=5.0):
    """pool.terminate(), waiting for it at most `wait` seconds. After Ctrl-C or an error it can wait
    forever: a task half-written to a worker it kills leaves the pool's feeder thread blocked on
    the pipe, and it joins that thread. By then its workers are gone (it ends them first), so the
    process may end without it."""
    import threading
    ending = threading.Thread(target=pool.terminate, daemon=True)
    ending.start()
    ending.join(wait)


def _worker_start(parent):
    """In a worker: leave Ctrl-C to the parent, and end the moment it does. Linux's PDEATHSIG kills
    the worker with its parent, before it can finish a task and write into the closed pipe (a
    BrokenPipeError traceback on the terminal after kill -9); elsewhere a thread looks every
    0.5 s."""
    import threading
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError, TypeError):
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        # the parent died before the line above
        os._exit(1)

    def end_with_parent():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=end_with_parent, daemon=True).start()


def ordered_map(pool, function, tasks, ahead):
    """function(*task) for each task, run on the pool, results in the order of the tasks, with at
    most `ahead` tasks given out at a time: unlike Pool.imap, which reads every task at once, memory
    stays bounded. Without a pool, each runs here."""
    if pool is None:
        yield from (function(*task) for task in tasks)
        return
    pending = collections.deque()
    for task in tasks:
        pending.append(pool.apply_async(function, task))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def in_child(function, batch=64):
    """The items of function(), an iterator, made in a child process and sent here in batches of
    `batch`: an exception there is raised here again, and a crash there (a library's segfault on a
    malformed file) is a ChildProcessError here instead of the end of this process. The child ends
    when the iteration here does, or this process.

        for text in in_child(dataset_texts): ...
    """
    import multiprocessing
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_send_items, args=(function, send, os.getpid(), batch),
                            daemon=True)
    child.start()
    send.close()
    try:
        while True:
            try:
                kind, value = receive.recv()
            except EOFError:
                child.join()
                raise ChildProcessError(f"ended with {_exit_status(child.exitcode)}") from None
            if kind == "items":
                yield from value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        child.kill()
        child.join()
        receive.close()


def _exit_status(code):
    """-11 -> 'signal SIGSEGV'; 3 -> 'exit status 3'."""
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit status {code}"


def _send_items(function, send, parent, batch):
    """In the child of in_child: send function()'s items in batches, then ('done', None), or the
    exception that stopped them."""
    _worker_start(parent)
    try:
        items = []
        for item in function():
            items.append(item)
            if len(items) >= batch:
                send.send(("items", items))
                items = []
        send.send(("items", items))
        send.send(("done", None))
    # the parent stopped reading: nothing to say
    except BrokenPipeError:
        pass
    except Exception as e:
        try:
            pickle.dumps(e)
        except Exception:
            e = RuntimeError(f"{type(e).__name__}: {e}")
        with contextlib.suppress(OSError):
            send.send(("error", e))
