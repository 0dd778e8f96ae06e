/* ctlwire.c - percent-encoding of control-protocol words, and the names
 * of the errors a reply carries. */
#include <errno.h>
#include <string.h>

#include "ctlwire.h"

static const char hex[] = "0123456789ABCDEF";

size_t xnbd__ctl_encoded_len(const char *s)
{
	size_t n = 0;
	for (; *s; s++)
		n += xnbd__ctl_escaped((unsigned char)*s) ? 3 : 1;
	return n;
}

size_t xnbd__ctl_encode(char *dst, const char *s)
{
	char *d = dst;
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (xnbd__ctl_escaped(c)) {
			*d++ = '%';
			*d++ = hex[c >> 4];
			*d++ = hex[c & 15];
		} else {
			*d++ = (char)c;
		}
	}
	return (size_t)(d - dst);
}

size_t xnbd__ctl_fit(const char *s, size_t cap)
{
	size_t i = 0, used = 0;
	for (; s[i]; i++) {
		size_t w = xnbd__ctl_escaped((unsigned char)s[i]) ? 3 : 1;
		if (used + w > cap)
			break;
		used += w;
	}
	/* Cut before a continuation byte's lead, not after it.  Only when
	 * something was cut: a complete string may end however it likes. */
	if (s[i])
		while (i > 0 && ((unsigned char)s[i] & 0xc0) == 0x80)
			i--;
	return i;
}

static int hexval(unsigned char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

int xnbd__ctl_decode(char *dst, const char *src, size_t len)
{
	size_t o = 0;
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)src[i];
		if (c == '%') {
			if (len - i < 3)
				return -EINVAL;
			int h = hexval((unsigned char)src[i + 1]);
			int l = hexval((unsigned char)src[i + 2]);
			if (h < 0 || l < 0 || (h == 0 && l == 0))
				return -EINVAL;
			dst[o++] = (char)(h << 4 | l);
			i += 2;
		} else if (c > 0x20 && c < 0x7f) {
			dst[o++] = (char)c;
		} else {
			return -EINVAL;
		}
	}
	dst[o] = '\0';
	return (int)o;
}

int xnbd__ctl_split(char *line, size_t len, char **argv, int max)
{
	int argc = 0;
	size_t start = 0;
	for (size_t i = 0; i <= len; i++) {
		if (i < len && line[i] != ' ')
			continue;
		if (argc == max)
			return -E2BIG;
		/* Decoding never lengthens a word, so the NUL it writes lands
		 * at the latest on the space (or the terminator) after it. */
		int r = xnbd__ctl_decode(line + start, line + start, i - start);
		if (r < 0)
			return r;
		argv[argc++] = line + start;
		start = i + 1;
	}
	argv[argc] = NULL;
	return argc;
}

/* Errors by name.  Where two names share a value on Linux (EAGAIN and
 * EWOULDBLOCK, ENOTSUP and EOPNOTSUPP) the first one is sent and both are
 * understood. */
#define E(x) \
	{ \
#x, x \
	}
static const struct {
	const char *name;
	int value;
} errnames[] = {
    E(EPERM),        E(ENOENT),        E(ESRCH),
    E(EINTR),        E(EIO),           E(ENXIO),
    E(E2BIG),        E(EBADF),         E(EAGAIN),
    E(EWOULDBLOCK),  E(ENOMEM),        E(EACCES),
    E(EBUSY),        E(EEXIST),        E(EXDEV),
    E(ENODEV),       E(ENOTDIR),       E(EISDIR),
    E(EINVAL),       E(EMFILE),        E(ENFILE),
    E(ETXTBSY),      E(EFBIG),         E(ENOSPC),
    E(ESPIPE),       E(EROFS),         E(EPIPE),
    E(EDOM),         E(ERANGE),        E(EDEADLK),
    E(ENAMETOOLONG), E(ENOLCK),        E(ENOSYS),
    E(ENOTEMPTY),    E(ELOOP),         E(ENODATA),
    E(ETIME),        E(EPROTO),        E(EBADMSG),
    E(EOVERFLOW),    E(EILSEQ),        E(ENOTSOCK),
    E(EDESTADDRREQ), E(EMSGSIZE),      E(EPROTONOSUPPORT),
    E(ENOTSUP),      E(EOPNOTSUPP),    E(EAFNOSUPPORT),
    E(EADDRINUSE),   E(EADDRNOTAVAIL), E(ENETDOWN),
    E(ENETUNREACH),  E(ECONNABORTED),  E(ECONNRESET),
    E(ENOBUFS),      E(EISCONN),       E(ENOTCONN),
    E(ESHUTDOWN),    E(ETIMEDOUT),     E(ECONNREFUSED),
    E(EHOSTDOWN),    E(EHOSTUNREACH),  E(EALREADY),
    E(EINPROGRESS),  E(ESTALE),        E(EDQUOT),
    E(ECANCELED),    E(ENOMEDIUM),
};
#undef E

const char *xnbd__ctl_errno_name(int err)
{
	for (size_t i = 0; i < sizeof(errnames) / sizeof(errnames[0]); i++)
		if (-errnames[i].value == err)
			return errnames[i].name;
	return NULL;
}

int xnbd__ctl_errno_value(const char *name)
{
	for (size_t i = 0; i < sizeof(errnames) / sizeof(errnames[0]); i++)
		if (strcmp(errnames[i].name, name) == 0)
			return -errnames[i].value;
	return -EIO;
}
