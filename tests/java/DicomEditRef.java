// Reference values for xnatmigrate's DicomEdit 6 interpreter, computed with the JDK only.
//
// Each algorithm is re-implemented from the DicomEdit 6 / mizer Java it stands for, using the same JDK
// classes XNAT's code relies on (MessageDigest, UUID, BigInteger, java.time.OffsetDateTime,
// java.text.MessageFormat, String.matches/substring/replace), independently of the Python under test:
//   hashUID   mizer UIDValue.getHashedUID: toUID(toUUID(s)); toUUID = java-uuid-generator
//             Generators.nameBasedGenerator().generate(s.getBytes()) (SHA-1, no namespace, version 5,
//             IETF variant: NameBasedGenerator.generate + UUIDUtil.constructUUID); toUID = "2.25." +
//             new BigInteger(b17) with b17 = 0x00, msb, lsb.
//   shift     dicomedit DefaultDicomDateTimeShifter.shiftDateTimeBySeconds + MidPointDateTimeFactory
//             + DicomDateTime.toDicomDateTimeString + DicomDateTimeShifter.toSeconds.
//   format    FormatScriptFunction: java.text.MessageFormat.format(pattern, strings).
//   derive    xnatmigrate's own departure (newUID / mapReferencedUIDs): HMAC-SHA256 → UUIDv8 → BigInteger.
//
// Protocol: one request per stdin line, fields separated by TAB, "\N" is a Java null; one answer per
// line on stdout: the result, or "ERROR <exception class>".
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.math.BigInteger;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.time.OffsetDateTime;
import java.time.YearMonth;
import java.time.ZoneOffset;
import java.util.UUID;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;

public class DicomEditRef {
    public static void main(String[] argv) throws Exception {
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        PrintStream out = new PrintStream(System.out, true, "UTF-8");
        String line;
        while ((line = in.readLine()) != null) {
            String[] f = line.split("\t", -1);
            for (int i = 0; i < f.length; i++) {
                if (f[i].equals("\\N")) f[i] = null;
            }
            try {
                out.println(answer(f));
            } catch (Exception e) {
                out.println("ERROR " + e.getClass().getSimpleName());
            }
        }
    }

    static String answer(String[] f) throws Exception {
        switch (f[0]) {
            case "hashUID": return hashUID(f[1]);
            case "shift": return shift(f[1], Long.parseLong(f[2]), f[3]);
            case "format": {
                Object[] args = new Object[f.length - 2];
                System.arraycopy(f, 2, args, 0, args.length);
                return java.text.MessageFormat.format(f[1], args);
            }
            case "derive": return derive(f[1], f[2], java.util.Arrays.copyOfRange(f, 3, f.length));
            case "matches": return Boolean.toString(f[1].matches(f[2]));
            case "substring": return f[1].substring(Integer.parseInt(f[2]), Integer.parseInt(f[3]));
            case "replace": return f[1].replace(f[2], f[3]);
            case "lowercase": return f[1].toLowerCase();
            case "uppercase": return f[1].toUpperCase();
            default: throw new IllegalArgumentException(f[0]);
        }
    }

    // --- hashUID
    static String hashUID(String value) throws Exception {
        MessageDigest sha1 = MessageDigest.getInstance("SHA-1");
        byte[] d = sha1.digest(value.getBytes(StandardCharsets.UTF_8));
        d[6] = (byte) ((d[6] & 0x0f) | 0x50);
        d[8] = (byte) ((d[8] & 0x3f) | 0x80);
        long msb = 0, lsb = 0;
        for (int i = 0; i < 8; i++) msb = (msb << 8) | (d[i] & 0xff);
        for (int i = 8; i < 16; i++) lsb = (lsb << 8) | (d[i] & 0xff);
        UUID uuid = new UUID(msb, lsb);
        byte[] b17 = new byte[17];
        fill(b17, 1, uuid.getMostSignificantBits());
        fill(b17, 9, uuid.getLeastSignificantBits());
        return "2.25." + new BigInteger(b17);
    }

    static void fill(byte[] bb, int off, long val) {
        for (int i = off, shift = 56; shift >= 0; i++, shift -= 8) bb[i] = (byte) (val >>> shift);
    }

    // --- derived UIDs (xnatmigrate)
    static String derive(String secret, String prefix, String[] parts) throws Exception {
        Mac mac = Mac.getInstance("HmacSHA256");
        mac.init(new SecretKeySpec(secret.getBytes(StandardCharsets.UTF_8), "HmacSHA256"));
        byte[] d = mac.doFinal(String.join("\u0000", parts).getBytes(StandardCharsets.UTF_8));
        byte[] b17 = new byte[17];
        System.arraycopy(d, 0, b17, 1, 16);
        b17[7] = (byte) ((b17[7] & 0x0f) | 0x80);
        b17[9] = (byte) ((b17[9] & 0x3f) | 0x80);
        String root = prefix.endsWith(".") ? prefix.substring(0, prefix.length() - 1) : prefix;
        return root + "." + new BigInteger(b17);
    }

    // --- date/time shift
    static final Pattern DT = Pattern.compile(
        "(\\d{4})((\\d{2})((\\d{2})((\\d{2})((\\d{2})((\\d{2})(\\.\\d{1,6})?)?)?)?)?)?([+-]\\d{4})?");

    static long toSeconds(long increment, String units) {
        switch (units.toLowerCase()) {
            case "years": return increment * 365 * 24 * 60 * 60;
            case "days": return increment * 24 * 60 * 60;
            case "hours": return increment * 60 * 60;
            case "minutes": return increment * 60;
            case "seconds": return increment;
            default: throw new UnsupportedOperationException(units);
        }
    }

    static String shift(String s, long increment, String units) {
        Matcher m = DT.matcher(s);
        if (!m.matches()) throw new IllegalArgumentException(s);
        String y = m.group(1), mo = m.group(3), d = m.group(5), h = m.group(7), mi = m.group(9), se = m.group(11);
        String frac = m.group(12), tz = m.group(13);
        int year = Integer.parseInt(y);
        int month = mo != null ? Integer.parseInt(mo) : 7;
        int day = d != null ? Integer.parseInt(d) : (mo != null ? YearMonth.of(year, month).lengthOfMonth() / 2 + 1 : 1);
        int hour = h != null ? Integer.parseInt(h)
            : d != null ? 12 : mo != null ? (YearMonth.of(year, month).lengthOfMonth() % 2 == 0 ? 0 : 12) : 0;
        int minute = mi != null ? Integer.parseInt(mi) : (h != null ? 30 : 0);
        int second = se != null ? Integer.parseInt(se) : (mi != null ? 30 : 0);
        OffsetDateTime odt = OffsetDateTime.of(year, month, day, hour, minute, second, 0, ZoneOffset.ofHours(0))
            .plusSeconds(toSeconds(increment, units));
        StringBuilder sb = new StringBuilder(String.format("%04d", odt.getYear()));
        if (mo != null) {
            sb.append(String.format("%02d", odt.getMonthValue()));
            if (d != null) {
                sb.append(String.format("%02d", odt.getDayOfMonth()));
                if (h != null) {
                    sb.append(String.format("%02d", odt.getHour()));
                    if (mi != null) {
                        sb.append(String.format("%02d", odt.getMinute()));
                        if (se != null) {
                            sb.append(String.format("%02d", odt.getSecond()));
                            if (frac != null) sb.append(frac);
                        }
                    }
                }
            }
        }
        if (tz != null) sb.append(tz);
        return sb.toString();
    }
}
