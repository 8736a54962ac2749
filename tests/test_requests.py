"""The request path: reply cleaning, refusals, --keep_tokens, the --max_retries budget, stopping, counting.

Pure functions are tested on tables; the rest through the real CLI against the loopback fake server, in-process
(`run_main`) where no signal is involved, in a subprocess (`Cli`, or `accelerate launch`) where one is. Vision
captions are seeded, so no vision model loads.
"""
from __future__ import annotations

import asyncio
import pickle
import signal
import subprocess
import threading

import pytest

import enhance_captions as ec
from tests.conftest import (Cli, caches, cli_env, kill_launch, lines_with, make_dataset, make_image, run_args, run_main,
                            seed_generated, two_process_command, user_message)
from tests.llm_server import reply, reset, status

REFUSAL_TEXT = "I\u2019m sorry, but I can\u2019t help with that."  # typographic apostrophes, as models write them


def args_for(ds, model_dir, server, *extra):
    return run_args(ds, model_dir("florence2"), server, *extra, batch_size=4)


# --------------------------------------------------------------------------------------------
# Cleaning: only what is certainly not caption text goes
# --------------------------------------------------------------------------------------------

WRAPPED = [  # (reply, manual caption, what is cached)
    ("Here is the caption: A red car.", None, "A red car."),
    ("Here's the merged caption:\nA red car.", None, "A red car."),
    ("Here\u2019s the merged caption: A red car.", None, "A red car."),
    ("Sure! Here's the merged caption: A red car.", None, "A red car."),
    ("Certainly, here is the combined caption: A red car.", None, "A red car."),
    ("Okay. Here is your final caption:\n\nA red car.", None, "A red car."),
    ("Caption: A red car.", None, "A red car."),
    ("**Final caption:** A red car.", None, "A red car."),
    ("**Final caption**: A red car.", None, "A red car."),
    ("Here is the caption for the image:\nA red car.", None, "A red car."),
    ("Here is the caption: ohwx woman in a garden.", "ohwx woman, garden", "ohwx woman in a garden."),
    ("<think>The manual caption names her.</think>\nohwx woman in a garden.", None, "ohwx woman in a garden."),
    ("The user wants one caption.\n</think>\n\nA red car.", None, "A red car."),
    ("Reasoning in capitals</THINK> A red car.", None, "A red car."),
    ("<think>\nnever closed", None, ""),
    ("```\nA red car.\n```", None, "A red car."),
    ("```text\nA red car.\n```", None, "A red car."),
    ('"A red car."', None, "A red car."),
    ("'A red car.'", None, "A red car."),
    ("\u201cA red car.\u201d", None, "A red car."),
    ("\u2018A red car.\u2019", None, "A red car."),
    ("\u00abA red car.\u00bb", None, "A red car."),
    ('<think>plan</think>\nHere is the combined caption:\n```text\n"A red car\nparked by a tree."\n```', None,
     "A red car parked by a tree."),
]


@pytest.mark.parametrize("raw, manual, clean", WRAPPED)
def test_wrapped_replies_are_unwrapped_exactly(raw, manual, clean):
    assert ec.clean_reply(raw, manual) == clean


CAPTIONS = [  # (caption, manual caption): each must come through as it is
    ("This is ohwx woman: a portrait in soft light.", "ohwx woman, portrait"),
    ("This is ohwx woman: a portrait in soft light.", None),
    ("This is a red car parked by a tree.", None),
    ("Here, a red car parked by a tree.", None),
    ("Here lies a weathered gravestone in a foggy churchyard.", None),
    ("Here: a red car parked by a tree.", None),
    ("Caption contest winner holding a trophy on a stage.", None),
    ("Captioned photo of a tabby cat: it sits on a windowsill.", None),
    ("Final caption card of a silent film, white letters on black.", None),
    ("Below the bridge: a calm river at dusk.", None),
    ("Below is a calm river at dusk, seen from the bridge.", None),
    ("Sure-footed mountain goat on a cliff.", None),
    ("Okay hand sign: thumb and index finger touching.", None),
    ("Here is the final caption: of a film, white on black.", "final caption card, black background"),
    ("a shop sign reading \"Sorry, we're closed\"", None),
    ('a neon sign that says "Here: open 24h"', None),
    ("ohwx woman: a portrait in soft light", "ohwx woman, portrait"),
    ("ohwx man, portrait: soft light, a red car.", None),
    ('"Open" sign above a door marked "Exit"', None),
    ("\u201cOpen\u201d sign above a door marked \u201cExit\u201d", None),
    ('"Hello" reads the sign, and "Exit" the door.', None),
    ('"Stay hungry, stay foolish" painted in white on a brick wall.', None),
    ("A poster with the words \"Caption: none\" in red.", None),
    ("'80s style poster of a car, 'Drive' written in neon", None),
]


@pytest.mark.parametrize("caption, manual", CAPTIONS)
def test_real_captions_come_through_byte_identical(caption, manual):
    assert ec.clean_reply(caption, manual) == caption


def test_cleaning_through_the_cli_keeps_the_trigger_of_a_caption_that_opens_with_this_is(
        tmp_path, capsys, model_dir, llm_server):
    images = make_dataset(tmp_path / "ds", 1, captions=False)
    images[0].with_suffix(".txt").write_text("ohwx woman, portrait", encoding="utf-8")
    seed_generated(images)
    llm_server.script(reply("This is ohwx woman: a portrait in soft light."))
    code, out, err = run_main(capsys, *args_for(tmp_path / "ds", model_dir, llm_server))
    assert code == 0, err
    assert caches(images[0])[1].read_bytes() == b"This is ohwx woman: a portrait in soft light.\n"


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------

REFUSALS = [
    "I'm sorry, but I can't help with that.",
    REFUSAL_TEXT,
    "I\u02bcm sorry, I can\u02bct do that.",
    "I AM SORRY, but this image cannot be described.",
    "i am sorry",
    "Sorry, but I can't help with that.",
    "I can't help with this request.",
    "I cannot assist with that.",
    "I can\u2019t provide a caption for this image.",
    "I can not describe people.",
    "I'm unable to describe this image.",
    "I am unable to help with that.",
    "As an AI, I cannot see images.",
    "As an AI language model, I do not caption photos.",
    '"I\u2019m sorry, but I can\u2019t help with that."',
    "\u201cI am unable to do that.\u201d",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_refusals_are_recognised_whatever_the_apostrophe_case_and_quotes(text):
    assert "refusal" in (ec.reply_problem(ec.clean_reply(text), "stop") or "")
    assert "refusal" in (ec.reply_problem(text, "stop") or "")  # also before cleaning


NOT_REFUSALS = [
    "a shop sign reading \"Sorry, we're closed\"",
    "\"Sorry, we're closed\" sign on a glass door.",
    "Sorry-looking wet dog on a porch.",
    "A card that says I'm sorry in pink letters.",
    '"I\'m sorry" written on a card, and a red rose.',
    "As an airplane takes off, a red car waits at the fence.",
    "I can see a red car.",
    "Icon of a camera, flat design.",
]


@pytest.mark.parametrize("text", NOT_REFUSALS)
def test_captions_that_mention_sorry_are_not_refusals(text):
    assert ec.reply_problem(ec.clean_reply(text), "stop") is None


def test_a_refusal_is_retried_then_reported_and_never_cached(tmp_path, capsys, model_dir, llm_server):
    images = make_dataset(tmp_path / "ds", 1)
    seed_generated(images)
    llm_server.reply = lambda body: reply(REFUSAL_TEXT)
    report = tmp_path / "report.jsonl"
    code, out, err = run_main(capsys, *args_for(tmp_path / "ds", model_dir, llm_server, "--max_retries", "2",
                                                "--report", report))
    assert code == 1, err
    assert len(llm_server.requests) == 3  # --max_retries 2: three requests, then it is given up
    assert not caches(images[0])[1].exists()
    failed = lines_with(err, "FAILED")
    assert len(failed) == 1 and "refusal" in failed[0] and REFUSAL_TEXT in failed[0], err
    assert "refusal" in report.read_text(encoding="utf-8")
    assert "llm: 0 done, 0 from cache, 1 failed" in out


# --------------------------------------------------------------------------------------------
# --keep_tokens: enforced by construction
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("manual, n, parts", [
    ("ohwx man,  red shirt , smiling", 2, ["ohwx man", "red shirt"]),
    ("ohwx man, red shirt", 5, ["ohwx man", "red shirt"]),  # fewer parts than N: all of them
    ("a woman smiling in a garden", 2, ["a woman smiling in a garden"]),  # no comma: one part, as in kohya
    (" , ohwx , ", 2, ["ohwx"]),
    ("ohwx man", 0, []),
    (None, 3, []),
])
def test_keep_token_parts(manual, n, parts):
    assert ec.keep_token_parts(manual, n) == parts


OHWX = ["ohwx man", "red shirt"]


@pytest.mark.parametrize("parts, text, combined", [
    (OHWX, "A smiling man in a red shirt, outdoors.", "ohwx man, red shirt, A smiling man in a, outdoors."),
    (OHWX, "A smiling man outdoors.", "ohwx man, red shirt, A smiling man outdoors."),
    (OHWX, "Outdoors, a smiling ohwx man.", "ohwx man, red shirt, Outdoors, a smiling."),
    (OHWX, "OHWX MAN, Red Shirt, smiling outdoors.", "ohwx man, red shirt, smiling outdoors."),
    (OHWX, "ohwx man, ohwx man, red shirt, red shirt, ohwx man smiling.", "ohwx man, red shirt, smiling."),
    (OHWX, "ohwx man's red shirt is bright.", "ohwx man, red shirt, is bright."),
    (OHWX, "(ohwx man) smiling in a [red shirt].", "ohwx man, red shirt, smiling in a."),
    (OHWX, "ohwx  man,\nred shirt", "ohwx man, red shirt"),
    (OHWX, "ohwx man", "ohwx man, red shirt"),
    (["ohwx", "ohwx man"], "ohwx man and ohwx.", "ohwx, ohwx man, and."),
    (["ohwx"], "ohwxy and ohwx smile.", "ohwx, ohwxy and smile."),  # word boundaries only
    (["red shirt."], "A man in a red shirt, smiling.", "red shirt. A man in a, smiling."),
    (["A woman smiling in a garden."], "A woman smiling in a garden. She wears a straw hat.",
     "A woman smiling in a garden. She wears a straw hat."),
    ([], "A red car.", "A red car."),
])
def test_keep_tokens_first(parts, text, combined):
    assert ec.keep_tokens_first(text, parts) == combined


KEEP_TOKEN_CASES = {  # manual caption: (the LLM's reply, the combined file's bytes) with --keep_tokens 2
    "subject0, photo number 0": ("A person standing by a window.",  # drops them
                                 "subject0, photo number 0, A person standing by a window."),
    "subject1, photo number 1": ("A person by a window, photo number 1, known as subject1.",  # moves them
                                 "subject1, photo number 1, A person by a window, known as."),
    "subject2, photo number 2": ("SUBJECT2, Photo Number 2, standing by a window.",  # re-cases them
                                 "subject2, photo number 2, standing by a window."),
    "subject3, photo number 3": ("subject3, photo number 3, subject3 standing by a window, photo number 3.",
                                 "subject3, photo number 3, standing by a window."),  # repeats them
    "ohwx woman in a garden": ("Ohwx woman in a garden, wearing a straw hat.",  # one part: no comma
                               "ohwx woman in a garden, wearing a straw hat."),
    "A woman smiling in a garden.": ("A woman smiling in a garden. She wears a straw hat.",
                                     "A woman smiling in a garden. She wears a straw hat."),
}


def test_keep_tokens_hold_through_the_cli_when_the_llm_never_complies(tmp_path, capsys, model_dir, llm_server):
    ds = tmp_path / "ds"
    images = []
    for i, manual in enumerate(KEEP_TOKEN_CASES):
        images.append(make_image(ds / f"img{i:03d}.jpg", i))
        images[-1].with_suffix(".txt").write_text(manual, encoding="utf-8")
    seed_generated(images)

    def answer(body):
        return next(text for manual, (text, _) in KEEP_TOKEN_CASES.items() if f"\n{manual}\n" in user_message(body))

    llm_server.reply = answer
    code, out, err = run_main(capsys, *args_for(ds, model_dir, llm_server, "--keep_tokens", "2",
                                                "--max_retries", "0"))
    assert code == 0, err
    assert len(llm_server.requests) == len(images)  # one request each: nothing is asked again
    for image, (_, combined) in zip(images, KEEP_TOKEN_CASES.values()):
        assert caches(image)[1].read_bytes() == combined.encode("utf-8") + b"\n", image.name


# --------------------------------------------------------------------------------------------
# --max_retries N: at most N + 1 requests per item, whatever fails
# --------------------------------------------------------------------------------------------

def alternating(*actions):
    """A reply function that answers with the actions in turn, round and round."""
    count = [0]

    def answer(body):
        count[0] += 1
        return actions[(count[0] - 1) % len(actions)]
    return answer


FAULTS = {
    "500": lambda: alternating(status(500)),
    "429": lambda: alternating(status(429)),
    "reset": lambda: alternating(reset()),
    "refusal": lambda: alternating(reply(REFUSAL_TEXT)),
    "500_then_refusal": lambda: alternating(status(500), reply(REFUSAL_TEXT)),
    "refusal_then_500": lambda: alternating(reply(REFUSAL_TEXT), status(500)),
}


@pytest.mark.parametrize("retries", [0, 1, 3])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_max_retries_is_the_number_of_requests_in_all(tmp_path, capsys, model_dir, llm_server, fault, retries):
    images = make_dataset(tmp_path / "ds", 1)
    seed_generated(images)
    llm_server.reply = FAULTS[fault]()
    code, out, err = run_main(capsys, *args_for(tmp_path / "ds", model_dir, llm_server,
                                                "--max_retries", str(retries)))
    assert code == 1, err
    assert len(llm_server.requests) == retries + 1
    assert not caches(images[0])[1].exists()
    assert len(lines_with(err, "FAILED")) == 1


# --------------------------------------------------------------------------------------------
# A stop that stops: SIGINT / SIGTERM
# --------------------------------------------------------------------------------------------

def stopped_within(run, signum, asked, timeout=15.0) -> int:
    """Send the signal, wait for the exit (a hang fails the test), and check nothing was sent after it."""
    run.proc.send_signal(signum)
    code = run.wait(timeout)
    assert len(run.server.requests) == asked, run.stderr[-3000:]
    return code


@pytest.mark.slow
def test_sigterm_during_rpm_waits_exits_143_at_once_and_sends_nothing_more(tmp_path, model_dir, llm_server):
    ds = tmp_path / "ds"
    images = make_dataset(ds, 12)
    seed_generated(images)
    run = Cli(tmp_path, "rpm", *args_for(ds, model_dir, llm_server, "--rpm", "2", "--concurrency", "4"))
    run.server = llm_server
    run.wait_for(lambda: len(llm_server.requests) >= 2, what="two LLM requests")
    assert stopped_within(run, signal.SIGTERM, asked=2) == 143  # the other workers were waiting a minute
    assert len([i for i in images if caches(i)[1].exists()]) == 2  # the two answered replies were saved
    assert "llm: 2 done, 0 from cache, 0 failed" in run.stdout


@pytest.mark.slow
@pytest.mark.parametrize("answer", [status(500), reply(REFUSAL_TEXT)], ids=["client_retry_sleep", "reply_backoff"])
def test_sigint_between_retries_exits_130_at_once_and_sends_nothing_more(tmp_path, model_dir, llm_server, answer):
    images = make_dataset(tmp_path / "ds", 1)
    seed_generated(images)
    llm_server.reply = lambda body: answer
    run = Cli(tmp_path, "retries", *args_for(tmp_path / "ds", model_dir, llm_server, "--max_retries", "5"),
              env=cli_env(ENHANCE_CAPTIONS_WAIT_SCALE="1"))  # unscaled: the signal lands in a wait of a second
    run.server = llm_server
    run.wait_for(lambda: len(llm_server.requests) >= 3, what="three tries")  # then a backoff of a second or more
    assert stopped_within(run, signal.SIGINT, asked=len(llm_server.requests)) == 130
    assert not caches(images[0])[1].exists()
    assert "llm: 0 done, 0 from cache, 0 failed" in run.stdout  # stopped, not failed: the next run does it


@pytest.mark.slow
def test_sigterm_to_the_launcher_of_a_two_process_run_stops_both_workers(tmp_path, model_dir, llm_server):
    ds = tmp_path / "ds"
    images = make_dataset(ds, 20)
    seed_generated(images)
    command, env = two_process_command(*args_for(ds, model_dir, llm_server, "--rpm", "2", "--concurrency", "2"))
    with open(tmp_path / "launch.out", "w") as out, open(tmp_path / "launch.err", "w") as err:
        launcher = subprocess.Popen(command, env=env, stdout=out, stderr=err, start_new_session=True)
    run = Cli.__new__(Cli)  # Cli's waiting and output, on the launcher's process
    run.proc, run.out_path, run.err_path, run.server = launcher, tmp_path / "launch.out", tmp_path / "launch.err", \
        llm_server
    try:
        run.wait_for(lambda: len(llm_server.requests) >= 2, timeout=300, what="a request from each process")
        code = stopped_within(run, signal.SIGTERM, asked=2)  # each process has 1 rpm: its next wait is a minute
        assert code != 0, run.stderr[-3000:]
    finally:
        kill_launch(launcher)


# --------------------------------------------------------------------------------------------
# Counting is race-free
# --------------------------------------------------------------------------------------------

def test_stats_counts_exactly_from_many_threads_and_still_pickles():
    stats = ec.Stats()
    rounds, threads = 5000, 8

    def hammer(n: int) -> None:
        for i in range(rounds):
            stats.count(ec.STAGE_LLM, "done")
            stats.count(ec.STAGE_VISION, "done")
            if i % 10 == n % 10:
                stats.fail(f"img{n}-{i}.jpg", ec.STAGE_LLM, "bad reply")

    workers = [threading.Thread(target=hammer, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert stats.counts[ec.STAGE_LLM]["done"] == stats.counts[ec.STAGE_VISION]["done"] == rounds * threads
    assert stats.counts[ec.STAGE_LLM]["failed"] == len(stats.failures) == rounds // 10 * threads
    copy = pickle.loads(pickle.dumps(stats))  # gather_object sends Stats between processes
    total = ec.Stats()
    total.merge(copy)
    total.merge(copy)
    assert total.counts[ec.STAGE_LLM]["done"] == 2 * rounds * threads
    copy.count(ec.STAGE_LLM, "done")  # the copy has a lock of its own


def test_a_stop_event_wakes_a_task_waiting_on_its_loop():
    """StopEvent.set() from another thread sets the loop's asyncio.Event: no polling, the waiter wakes."""
    stop = ec.StopEvent()
    events = ec.EventLoopThread(stop)
    try:
        async def wait_for_stop():
            await events.stopping.wait()
            return "woken"

        future = asyncio.run_coroutine_threadsafe(wait_for_stop(), events.loop)
        threading.Timer(0.05, stop.set).start()
        assert future.result(timeout=10) == "woken"
        late = stop.on_loop(events.loop)  # made after the stop: set already
        assert events.run(asyncio.wait_for(late.wait(), 10)) is True
    finally:
        events.close()
