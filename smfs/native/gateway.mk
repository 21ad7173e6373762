# smfs-gateway: the Maelstrom gateway program in C (gateway.c over the smfs_core sources).
# Run from anywhere:  make -f smfs/native/gateway.mk [all|static|asan|clean]
#
#   build/smfs-gateway         dynamic, for this host (-lcrypto)
#   build/smfs-gateway-static  -static, Debian's libcrypto.a: runs in a Debian bookworm guest
#                              whatever the host (python -m smfs.gateway --engine c prefers it)
#   build/smfs-gateway-asan    AddressSanitizer + UBSan, for the tests
# Debian: gcc, make, libssl-dev.

D := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
B := $(D)/build

ifeq ($(origin CC),default)
CC := gcc
endif
WARN := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wvla
CORE_FLAGS := -std=c11 -D_POSIX_C_SOURCE=200809L $(WARN)
GW_FLAGS := -std=c11 $(WARN)
OPT ?= -O2 -g
SAN := -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
LIBS := -lcrypto -lm
STATIC_LIBS := -Wl,-Bstatic -lcrypto -lm -lpthread -ldl

CORE := $(addprefix $(D)/,smfs_core.c fec.c tunnel.c flows.c offload.c)
HDRS := $(addprefix $(D)/,smfs_core.h smfs_internal.h)
DEPS := $(D)/gateway.c $(CORE) $(HDRS) $(D)/gateway.mk

.PHONY: all static asan clean
all: $(B)/smfs-gateway $(B)/smfs-gateway-static
static: $(B)/smfs-gateway-static
asan: $(B)/smfs-gateway-asan

# The core compiles as its own Makefile compiles it; gateway.c needs the GNU socket calls.
define link
	@mkdir -p $(B)/obj-$(1)
	set -e; for f in $(CORE); do \
	  $(CC) $(CORE_FLAGS) $(2) -c $$f -o $(B)/obj-$(1)/$$(basename $$f .c).o; done
	$(CC) $(GW_FLAGS) $(2) -c $(D)/gateway.c -o $(B)/obj-$(1)/gateway.o
	$(CC) $(2) $(3) -o $@.tmp $(B)/obj-$(1)/*.o $(4) && mv $@.tmp $@
endef

$(B)/smfs-gateway: $(DEPS)
	$(call link,dyn,$(OPT),,$(LIBS))

$(B)/smfs-gateway-static: $(DEPS)
	$(call link,static,$(OPT),-static,$(STATIC_LIBS))

$(B)/smfs-gateway-asan: $(DEPS)
	$(call link,asan,$(SAN),,$(LIBS))

clean:
	rm -rf $(B)/smfs-gateway $(B)/smfs-gateway-static $(B)/smfs-gateway-asan $(B)/obj-dyn $(B)/obj-static $(B)/obj-asan
