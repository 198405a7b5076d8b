# loyalty: a customer loyalty program inside PostgreSQL 15.
#
# `make demo` and `make test` work on a fresh Debian 12 machine: they first
# install what is missing (scripts/setup), which is why this file must also
# make sense before PGXS (postgresql-server-dev-15) is there.

EXTENSION  = loyalty
EXTVERSION = $(shell sed -n "s/^default_version = '\(.*\)'/\1/p" loyalty.control)
PG_CONFIG ?= pg_config

MODULE_big = loyalty
OBJS = $(patsubst %.c,%.o,$(sort $(wildcard src/*.c)))

# The install script of the current version is built from the topic files
# sql/NN_topic.sql, concatenated in name order. Released versions' scripts
# and the upgrade scripts sql/loyalty--A--B.sql are committed as they are.
SQL_TOPICS = $(sort $(filter-out sql/$(EXTENSION)--%,$(wildcard sql/*.sql)))
DATA_built = sql/$(EXTENSION)--$(EXTVERSION).sql
DATA = $(filter-out $(DATA_built),$(wildcard sql/$(EXTENSION)--*.sql))

TESTS = $(sort $(wildcard test/sql/*.sql))
REGRESS = $(patsubst test/sql/%.sql,%,$(TESTS))
REGRESS_OPTS = --inputdir=test --temp-config=test/loyalty.conf --temp-instance=./tmp_check
ISOLATION = $(patsubst test/specs/%.spec,%,$(sort $(wildcard test/specs/*.spec)))
ISOLATION_OPTS = --inputdir=test --temp-config=test/loyalty.conf --temp-instance=./tmp_check_iso
TAP_TESTS = 1
PROVE_TESTS = $(sort $(wildcard test/t/*.pl))

PG_CPPFLAGS = -I$(srcdir)/src
EXTRA_CLEAN = tmp_check_iso output_iso

PGXS := $(shell $(PG_CONFIG) --pgxs 2>/dev/null)
ifneq ($(wildcard $(PGXS)),)
include $(PGXS)
else
all:
	@echo "PGXS is not installed (postgresql-server-dev-15): run 'make setup' first," >&2
	@echo "or 'make demo' / 'make test', which run it for you." >&2
	@exit 1
endif

# Every object depends on every header of ours: a changed struct must not
# leave an object compiled against the old layout.
$(OBJS): $(wildcard src/*.h)

$(DATA_built): $(SQL_TOPICS) loyalty.control Makefile
	@{ printf '%s\n' '-- complain if script is sourced in psql, rather than via CREATE EXTENSION' \
	     '\echo Use "CREATE EXTENSION $(EXTENSION)" to load this file. \quit'; \
	   for f in $(SQL_TOPICS); do printf '\n-- %s\n' "$$f"; cat $$f; done; } > $@

.PHONY: setup demo demo-stop test bench

# Install the Debian packages the build, the tests and the demo need.
setup:
	@scripts/setup

# Build, install, start a throwaway server and tour the program.
demo: setup
	@$(MAKE) --no-print-directory -s install
	@scripts/demo start

demo-stop:
	@scripts/demo stop

# Every suite: regression (with pgTAP), isolation, TAP. Ends "N passed, N failed".
test: setup
	@$(MAKE) --no-print-directory -s all
	@$(MAKE) --no-print-directory -s install
	@scripts/test $(TEST)

bench:
	@scripts/setup bench
	@$(MAKE) --no-print-directory -s all
	@$(MAKE) --no-print-directory -s install
	@scripts/bench $(BENCH)
