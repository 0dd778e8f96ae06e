/* xnbd/common.h - definitions shared by every public header. */
#ifndef XNBD_COMMON_H
#define XNBD_COMMON_H

#if defined(XNBD_BUILDING_LIBRARY) && defined(__GNUC__)
#define XNBD_EXPORT __attribute__((visibility("default")))
#else
#define XNBD_EXPORT
#endif

#endif
