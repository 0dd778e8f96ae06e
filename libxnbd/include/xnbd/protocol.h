/* xnbd/protocol.h - constants of the NBD wire protocol.
 *
 * The values follow doc/proto.md of the NetworkBlockDevice/nbd project.
 * Every multi-byte field on the wire is big-endian.  These are plain
 * constants, so a tool linking libxnbd can speak the protocol without
 * copying them.
 */
#ifndef XNBD_PROTOCOL_H
#define XNBD_PROTOCOL_H

#include <stdint.h>

/* Handshake magics. */
#define XNBD_MAGIC_INIT 0x4e42444d41474943ULL /* "NBDMAGIC" */
#define XNBD_MAGIC_OPTS 0x49484156454F5054ULL /* "IHAVEOPT" */
#define XNBD_MAGIC_OLDSTYLE 0x00420281861253ULL
#define XNBD_MAGIC_REP 0x3e889045565a9ULL

/* Transmission magics. */
#define XNBD_MAGIC_REQUEST 0x25609513U
#define XNBD_MAGIC_SIMPLE_REPLY 0x67446698U
#define XNBD_MAGIC_STRUCTURED_REPLY 0x668e33efU

/* Handshake flags (server, 16 bits). */
#define XNBD_FLAG_FIXED_NEWSTYLE (1U << 0)
#define XNBD_FLAG_NO_ZEROES (1U << 1)

/* Client flags (32 bits). */
#define XNBD_FLAG_C_FIXED_NEWSTYLE (1U << 0)
#define XNBD_FLAG_C_NO_ZEROES (1U << 1)

/* Transmission flags (16 bits). */
#define XNBD_FLAG_HAS_FLAGS (1U << 0)
#define XNBD_FLAG_READ_ONLY (1U << 1)
#define XNBD_FLAG_SEND_FLUSH (1U << 2)
#define XNBD_FLAG_SEND_FUA (1U << 3)
#define XNBD_FLAG_ROTATIONAL (1U << 4)
#define XNBD_FLAG_SEND_TRIM (1U << 5)
#define XNBD_FLAG_SEND_WRITE_ZEROES (1U << 6)
#define XNBD_FLAG_SEND_DF (1U << 7)
#define XNBD_FLAG_CAN_MULTI_CONN (1U << 8)
#define XNBD_FLAG_SEND_RESIZE (1U << 9)
#define XNBD_FLAG_SEND_CACHE (1U << 10)
#define XNBD_FLAG_SEND_FAST_ZERO (1U << 11)

/* Options. */
#define XNBD_OPT_EXPORT_NAME 1U
#define XNBD_OPT_ABORT 2U
#define XNBD_OPT_LIST 3U
#define XNBD_OPT_PEEK_EXPORT 4U
#define XNBD_OPT_STARTTLS 5U
#define XNBD_OPT_INFO 6U
#define XNBD_OPT_GO 7U
#define XNBD_OPT_STRUCTURED_REPLY 8U
#define XNBD_OPT_LIST_META_CONTEXT 9U
#define XNBD_OPT_SET_META_CONTEXT 10U
#define XNBD_OPT_EXTENDED_HEADERS 11U

/* Option reply types. */
#define XNBD_REP_ACK 1U
#define XNBD_REP_SERVER 2U
#define XNBD_REP_INFO 3U
#define XNBD_REP_META_CONTEXT 4U
#define XNBD_REP_FLAG_ERROR (1U << 31)
#define XNBD_REP_ERR_UNSUP (XNBD_REP_FLAG_ERROR | 1U)
#define XNBD_REP_ERR_POLICY (XNBD_REP_FLAG_ERROR | 2U)
#define XNBD_REP_ERR_INVALID (XNBD_REP_FLAG_ERROR | 3U)
#define XNBD_REP_ERR_PLATFORM (XNBD_REP_FLAG_ERROR | 4U)
#define XNBD_REP_ERR_TLS_REQD (XNBD_REP_FLAG_ERROR | 5U)
#define XNBD_REP_ERR_UNKNOWN (XNBD_REP_FLAG_ERROR | 6U)
#define XNBD_REP_ERR_SHUTDOWN (XNBD_REP_FLAG_ERROR | 7U)
#define XNBD_REP_ERR_BLOCK_SIZE_REQD (XNBD_REP_FLAG_ERROR | 8U)
#define XNBD_REP_ERR_TOO_BIG (XNBD_REP_FLAG_ERROR | 9U)

/* NBD_INFO_* types carried in NBD_REP_INFO. */
#define XNBD_INFO_EXPORT 0U
#define XNBD_INFO_NAME 1U
#define XNBD_INFO_DESCRIPTION 2U
#define XNBD_INFO_BLOCK_SIZE 3U

/* Commands. */
#define XNBD_CMD_READ 0U
#define XNBD_CMD_WRITE 1U
#define XNBD_CMD_DISC 2U
#define XNBD_CMD_FLUSH 3U
#define XNBD_CMD_TRIM 4U
#define XNBD_CMD_CACHE 5U
#define XNBD_CMD_WRITE_ZEROES 6U
#define XNBD_CMD_BLOCK_STATUS 7U
#define XNBD_CMD_RESIZE 8U

/* Command flags. */
#define XNBD_CMD_FLAG_FUA (1U << 0)
#define XNBD_CMD_FLAG_NO_HOLE (1U << 1)
#define XNBD_CMD_FLAG_DF (1U << 2)
#define XNBD_CMD_FLAG_REQ_ONE (1U << 3)
#define XNBD_CMD_FLAG_FAST_ZERO (1U << 4)

/* Structured reply flags and chunk types. */
#define XNBD_REPLY_FLAG_DONE (1U << 0)
#define XNBD_REPLY_TYPE_NONE 0U
#define XNBD_REPLY_TYPE_OFFSET_DATA 1U
#define XNBD_REPLY_TYPE_OFFSET_HOLE 2U
#define XNBD_REPLY_TYPE_BLOCK_STATUS 5U
#define XNBD_REPLY_TYPE_ERROR ((1U << 15) + 1U)
#define XNBD_REPLY_TYPE_ERROR_OFFSET ((1U << 15) + 2U)

/* Error values on the wire (not the host's errno values). */
#define XNBD_EPERM 1U
#define XNBD_EIO 5U
#define XNBD_ENOMEM 12U
#define XNBD_EINVAL 22U
#define XNBD_ENOSPC 28U
#define XNBD_EOVERFLOW 75U
#define XNBD_ENOTSUP 95U
#define XNBD_ESHUTDOWN 108U

/* base:allocation extent flags. */
#define XNBD_STATE_HOLE (1U << 0)
#define XNBD_STATE_ZERO (1U << 1)
/* Flag of the "x-xnbd:cache" meta context: the proxy holds the block. */
#define XNBD_STATE_CACHED (1U << 0)

/* Sizes of fixed wire structures, in bytes. */
#define XNBD_REQUEST_SIZE 28U
#define XNBD_SIMPLE_REPLY_SIZE 16U
#define XNBD_STRUCTURED_REPLY_SIZE 20U
#define XNBD_OPTION_HEADER_SIZE 16U
#define XNBD_OPTION_REPLY_HEADER_SIZE 20U

/* Limits this implementation enforces.  A string from the wire (export
 * name, query) may be at most XNBD_MAX_STRING bytes, as the spec says. */
#define XNBD_MAX_STRING 4096U
/* Largest READ or WRITE payload served; advertised as the maximum block
 * size in NBD_INFO_BLOCK_SIZE. */
#define XNBD_MAX_PAYLOAD (32U * 1024U * 1024U)

#endif
