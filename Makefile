# Crucible: `make setup` once on a fresh Debian 12 machine, then `make test`.
ARCH ?= x86_64
PYTHON ?= python3
# Scenario workers: one guest each. Two fit this 2-core machine.
JOBS ?= 2
ACCEL ?= auto
# Guest distro (matrix axis): bookworm (Debian 12) or trixie (Debian 13:
# kernel 6.12, python3.13, criu 4.1).
DISTRO ?= bookworm
# Guest kernel (matrix axis), one of the distro's: bookworm 6.1 (its own) or
# backports (bookworm-backports); trixie 6.12 (its own). Default: the distro's own.
KERNEL ?= $(if $(filter trixie,$(DISTRO)),6.12,6.1)
# A run's name in report files: bookworm's as before the distro axis.
CELL = $(ARCH)-$(if $(filter-out bookworm,$(DISTRO)),$(DISTRO)-)$(KERNEL)-$(ENGINE)
# Engine the scenarios run against (matrix axis): ckpt or criu.
ENGINE ?= ckpt
# Where `make mutants` runs the corpus: local (this host, default: 24 x 64 runs
# are too many for TCG guests) or guest.
MUTANT_TARGET ?= local
# Which mutants: all, or a list of names (harness/mutants.py --list).
MUTANTS ?= all
MUTANT_RUN = reports/mutants-run
# Generated scenarios (make vm-generate): how many, from which seed.
GENERATE ?= 300
SEED ?= 1

APT_PACKAGES = qemu-system-x86 qemu-utils mmdebstrap e2fsprogs busybox-static cpio zstd \
               openssh-client gcc libc6-dev ca-certificates libnftables1 \
               make pkg-config libaio-dev libcap-dev iputils-ping
ifeq ($(ARCH),aarch64)
APT_PACKAGES += qemu-system-arm qemu-user-static binfmt-support arch-test
endif

.PHONY: setup setup-apt setup-pip setup-zdtm bytecode host-criu test test-host test-aarch64-guest lint-workflows vm-image vm-shell vm-test \
        vm-generate mutants bench reliability zdtm clean-image help

help:
	@echo "make setup              install host packages (apt) and Python packages (pip)"
	@echo "make test               host tests (engine on real processes) + scenarios in guests"
	@echo "make test-host          only the fast host tier (tests/)"
	@echo "make vm-image ARCH=..   build (or reuse) the cached guest image"
	@echo "make vm-shell ARCH=..   boot a guest with the engine installed and open a shell in it"
	@echo "make vm-test ARCH=..    run the scenario corpus in guests (JOBS=$(JOBS) workers;"
	@echo "                        DISTRO=bookworm|trixie, KERNEL=.., ENGINE=ckpt|criu)"
	@echo "make mutants            the corpus against ckpt and every mutant engine: which scenario kills which"
	@echo "                        (MUTANT_TARGET=local|guest; table in reports/mutants.md, .json)"
	@echo "make vm-generate        run GENERATE=$(GENERATE) generated scenarios from SEED=$(SEED) in guests"
	@echo "make test-aarch64-guest the aarch64 guest tests of tests/ (needs make vm-image ARCH=aarch64)"
	@echo "make bench              write benchmark figures to bench/results.json"
	@echo "make host-criu          Debian 13's criu for the host comparison, in ~/.cache/crucible/criu"
	@echo "                        (private apt config and prefix; make bench fetches it when missing)"
	@echo "make zdtm               CRIU's zdtm static tests against ckpt (Debian's CRIU 4.1.1 source, fetched once)"
	@echo "                        and the transition ones (state changing while dumped) -> bench/zdtm*.json,"
	@echo "                        bench/zdtm*.md: pass / refused (reason) / FAIL"
	@echo "make reliability        fault points + ckpt killed at random instants + FUZZ_CASES=$(FUZZ_CASES) mutated"
	@echo "                        images from FUZZ_SEED=$(FUZZ_SEED) -> bench/reliability.json"

setup: setup-apt setup-pip setup-zdtm

# CRIU's source (pinned), for tests/test_zdtm.py and make zdtm.
setup-zdtm:
	$(PYTHON) tools/zdtm.py --fetch-only

setup-apt:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "setup: installing$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	else echo "setup: host packages present"; fi

setup-pip:
	$(PYTHON) -m pip install -q -e '.[test]'
	$(MAKE) --no-print-directory bytecode

# The engine's bytecode, so that no ckpt run compiles it (~35 ms each), and
# its bundle (engine/bundle.py: one file instead of ~45 module lookups a run).
bytecode:
	$(PYTHON) -m compileall -q engine >/dev/null
	$(PYTHON) -S -m engine.mkbundle >/dev/null

# Debian 13's criu 4.1 and its libraries unpacked into a private prefix, run
# by their own loader (harness/hostcriu.py): Debian 12's criu 3.17 fails
# `criu check` on newer host kernels, and trixie's .deb needs trixie's libc.
# The host's apt sources and packages are not touched.
host-criu:
	$(PYTHON) -m harness.hostcriu install
	$(PYTHON) -m harness.hostcriu check

test: test-host vm-test

# Two workers: the engine tests mostly wait on their targets.
test-host: lint-workflows bytecode
	$(PYTHON) -m pytest tests/ -q -p no:cacheprovider -p no:benchmark -n $(JOBS)

# actionlint over the CI workflows (binary from the `test` extra).
lint-workflows:
	@command -v actionlint >/dev/null 2>&1 || { echo "lint-workflows: actionlint not found; make setup-pip installs it"; exit 2; }
	actionlint -no-color .github/workflows/*.yml

vm-image:
	$(PYTHON) -m vm image --arch $(ARCH) --kernel $(KERNEL) --distro $(DISTRO)

vm-shell:
	$(PYTHON) -m vm shell --arch $(ARCH) --kernel $(KERNEL) --distro $(DISTRO) --accel $(ACCEL)

# --kernel is passed only off the default until the harness has that option.
vm-test: vm-image
	$(PYTHON) -m pytest scenarios/ -q -p no:benchmark -n $(JOBS) --dist worksteal --arch $(ARCH) --accel $(ACCEL) \
	  --kernel $(KERNEL) --distro $(DISTRO) --engine $(ENGINE) \
	  --junitxml reports/junit-$(CELL).xml

# One pytest run: ckpt (the control: a scenario ckpt fails kills nothing) and
# every mutant engine (harness/mutants.py). pytest fails because mutants fail
# scenarios - that is the point; the table decides: it exits non-zero naming
# every mutant no scenario killed. The pytest log goes to $(MUTANT_RUN)/.
mutants:
	@rm -rf $(MUTANT_RUN) && mkdir -p $(MUTANT_RUN)
	@echo "mutants: corpus x (ckpt + $$($(PYTHON) harness/mutants.py --list | wc -l) mutants) on $(MUTANT_TARGET); log in $(MUTANT_RUN)/pytest.log"
	-CRUCIBLE_REPORTS=$(MUTANT_RUN) $(PYTHON) -m pytest scenarios/ -q -p no:cacheprovider -p no:benchmark --tb=no \
	  -n $(JOBS) --dist worksteal --target $(MUTANT_TARGET) --engine ckpt $(foreach m,$(MUTANTS),--engine mutant:$(m)) \
	  $(if $(filter guest,$(MUTANT_TARGET)),--arch $(ARCH) --accel $(ACCEL) --kernel $(KERNEL) --distro $(DISTRO)) \
	  > $(MUTANT_RUN)/pytest.log 2>&1
	@tail -n 3 $(MUTANT_RUN)/pytest.log
	@# the rows as they came when the run died before its summary
	$(PYTHON) tools/mutant_table.py $$(test -f $(MUTANT_RUN)/scenarios.json && echo $(MUTANT_RUN)/scenarios.json \
	  || echo $(MUTANT_RUN)/rows.jsonl) --out reports
# Generated scenarios (harness/generate.py): their own report directory, so
# they do not replace the corpus's reports/scenarios.json; failing cases are
# shrunk to reports/generated/found/.
vm-generate: vm-image
	CRUCIBLE_REPORTS=reports/generated $(PYTHON) -m pytest scenarios/ -q -p no:benchmark -n $(JOBS) --dist worksteal \
	  --arch $(ARCH) --accel $(ACCEL) --kernel $(KERNEL) --distro $(DISTRO) --engine $(ENGINE) \
	  --generate $(GENERATE) --seed $(SEED) --found-dir reports/generated/found \
	  --junitxml reports/generated/junit-generated-$(CELL).xml

# The aarch64 guest tests among tests/; they skip without the cached aarch64
# image, which CRUCIBLE_REQUIRE_AARCH64 turns into a failure (CI builds it).
test-aarch64-guest:
	CRUCIBLE_REQUIRE_AARCH64=1 $(PYTHON) -m pytest tests/ -m aarch64 -q -p no:cacheprovider -p no:benchmark

# CRIU's own C/R tests (test/zdtm/static), written by the people who know
# what C/R breaks, each checking its own state after the restore.
zdtm: bytecode
	@mkdir -p bench
	$(PYTHON) tools/zdtm.py -j $(JOBS) --out bench/zdtm.json --md bench/zdtm.md
	$(PYTHON) tools/zdtm.py --suite transition -j $(JOBS) --out bench/zdtm-transition.json --md bench/zdtm-transition.md

# Fault points, ckpt killed at random instants (and, from other tools, fuzzed
# images): figures printed and merged into bench/reliability.json. One line per tool.
RELIABILITY_KILLS ?= 200
# Mutated images against ckpt restore (harness/imagefuzz.py): how many, from which seed.
FUZZ_CASES ?= 500
FUZZ_SEED ?= 1
reliability:
	@mkdir -p bench
	$(PYTHON) bench/reliability.py --out bench/reliability.json --kills $(RELIABILITY_KILLS)
	$(PYTHON) bench/fuzz_images.py --out bench/reliability.json --cases $(FUZZ_CASES) --seed $(FUZZ_SEED)

bench: bytecode
	@mkdir -p bench
	$(PYTHON) bench/engine_bench.py --out bench/results.json
	$(PYTHON) -m vm bench --arch $(ARCH) --kernel $(KERNEL) --distro $(DISTRO) --out bench/results.json
	$(PYTHON) -m harness bench --arch $(ARCH) --kernel $(KERNEL) --out bench/results.json
	@# ckpt against the guest's criu (bookworm 3.17, trixie 4.1) in one guest; on this host too, with
	@# Debian 13's criu from ~/.cache/crucible/criu (make host-criu; fetched here when missing)
	$(PYTHON) -m harness compare --arch $(ARCH) --kernel $(KERNEL) --distro $(DISTRO) --host --out bench/results.json
	$(PYTHON) bench/table.py bench/results.json
