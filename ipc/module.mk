# ipc/: msgpack-rpc framing and checks, the shared-memory token ring.
IPC_SRCS := ipc/prescan.c ipc/proto.c ipc/ring.c
LIB_SRCS += $(IPC_SRCS)
