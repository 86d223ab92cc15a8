/* log.h — the daemon's log: one line per call on stderr with a syslog level
 * prefix "<N>" that journald reads. Any thread (each line is one write). */
#ifndef DS_LOG_H
#define DS_LOG_H

enum { DS_LOG_ERR = 3, DS_LOG_WARNING = 4, DS_LOG_NOTICE = 5, DS_LOG_INFO = 6, DS_LOG_DEBUG = 7 };

void ds_log_set_level(int level);
void ds_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
